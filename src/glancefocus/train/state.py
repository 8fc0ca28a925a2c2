"""The run folder and the training state stored in its checkpoints.

    RUN/config.yaml           the resolved configuration
    RUN/stageN/last.pt        the latest state of stage N (written at the end of every epoch, and
                              in stage 2 every few updates), what --resume continues from
    RUN/stageN/best.pt        the epoch with the best last-step evaluation accuracy
    RUN/stageN/interrupted.pt stages 1/3 stopped mid-epoch by SIGINT/SIGTERM: the weights then
    RUN/stageN/metrics.csv    one row per epoch (stage 2: per update)
    RUN/one-stage/...         the one-stage recipe's run, laid out as a stage's (and ppo.csv,
                              one row per policy update)

Resuming checks that the configuration is the run's own: only the keys in MAY_DIFFER_ON_RESUME
may change (training length, data workers, the folder's name, the initial weights source).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from torch import nn

from ..atomic import write_atomic, write_text
from ..checkpoint import (
    FORMAT,
    CheckpointError,
    check_compatible,
    load_state_checked,
    model_from_checkpoint_dict,
    read_checkpoint,
    save_checkpoint,
)
from ..config import ConfigError
from .runtime import capture_rng

MAY_DIFFER_ON_RESUME = frozenset(
    [f"train.stage{n}.{key}" for n in (1, 2, 3) for key in ("epochs", "updates")]
    + ["train.one_stage.epochs"]
    + ["data.num_workers", "train.out_dir", "model.pretrained", "model.pretrained_tag",
       "model.pretrained_glance",
       # how a step is split and computed on this device, not what it computes
       "train.micro_batch", "train.activation_checkpointing", "train.memory_budget", "train.amp"])


ONE_STAGE = 0
"""The one-stage recipe's number where the three stages have theirs (in seeds, data epochs and
the training state of checkpoints); its folder is RUN/one-stage."""


def stage_folder(out_dir, stage: int) -> Path:
    return Path(out_dir) / ("one-stage" if stage == ONE_STAGE else f"stage{stage}")


def stage_name(stage: int) -> str:
    """'stage N', or 'one-stage' for the one-stage recipe's run (in log lines)."""
    return "one-stage" if stage == ONE_STAGE else f"stage {stage}"


def stage_settings(train_config, stage: int):
    """The section of train_config that configures `stage` (train.stage1..3, train.one_stage)."""
    return train_config.one_stage if stage == ONE_STAGE else getattr(train_config, f"stage{stage}")


def recipe_stages(recipe: str) -> tuple[int, ...]:
    """The stages a recipe runs, in order."""
    return (ONE_STAGE,) if recipe == "one-stage" else (1, 2, 3)


def final_checkpoint(out_dir, recipe: str) -> Path:
    """The trained model of a finished run: the last stage's last.pt."""
    return last_checkpoint(out_dir, recipe_stages(recipe)[-1])


def last_checkpoint(out_dir, stage: int) -> Path:
    return stage_folder(out_dir, stage) / "last.pt"


def training_state(stage: int, *, epoch: int, update: int, finished: bool, optimizer,
                   best_metric: float, nonfinite: int, scaler=None, world_size: int = 1) -> dict:
    """What --resume needs: counters, optimiser (and AMP scaler), best metric, RNG states.

    The learning-rate schedule is a function of the epoch, so the epoch is its position.
    """
    return {
        "stage": stage, "epoch": epoch, "update": update, "finished": finished,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_metric": best_metric, "nonfinite": nonfinite, "rng": capture_rng(),
        "world_size": world_size,
    }


def save_stage_checkpoint(model, folder: Path, run_config: dict, training: dict,
                          is_best: bool) -> None:
    """last.pt (atomically), and a copy as best.pt when this is the best so far."""
    last = folder / "last.pt"
    save_checkpoint(model, last, run_config=run_config, training=training)
    if is_best:
        write_atomic(folder / "best.pt", lambda tmp: shutil.copyfile(last, tmp))


def write_run_config(out_dir, config_dict: dict) -> None:
    import yaml

    write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))


def load_weights(model, path, model_config, trust_pickle: bool = False) -> dict:
    """Load a checkpoint of this run (resume, previous stage) into `model`; its raw dict."""
    data = read_checkpoint(path, trust_pickle=trust_pickle)
    if data.get("format") != FORMAT:
        raise ConfigError(f"'{path}' is an authors' release file, not a checkpoint of this run")
    check_compatible(data, model_config, path)
    load_state_checked(model, data["state_dict"], path)
    model.pretrained_glance_head = bool(data.get("pretrained_glance_head", False))
    return data


def load_initial_weights(model, path, trust_pickle: bool = False) -> list[str]:
    """Start `model` from a GFNet checkpoint (native or, with trust_pickle, an authors' file),
    possibly made for another class set: encoders, policy and the classifier's recurrent state
    carry over; when the class counts differ every class-sized layer (the classifier's output
    layers, both encoders' own heads) keeps its fresh initialisation. Returns those layers."""
    source = model_from_checkpoint_dict(read_checkpoint(path, trust_pickle=trust_pickle), path)
    for field in ("arch", "patch_size", "max_steps", "classifier", "in_chans"):
        ours, theirs = getattr(model.config, field), getattr(source.config, field)
        if ours != theirs:
            raise CheckpointError(f"--init: '{path}' was made for model.{field}={theirs!r}, but "
                                  f"this run has model.{field}={ours!r}")
    state = source.state_dict()
    same_classes = source.config.num_classes == model.config.num_classes
    fresh = [] if same_classes else class_sized_layers(model)
    own = model.state_dict()
    for layer in fresh:
        for key in [k for k in state if k.startswith(layer + ".")]:
            state[key] = own[key]
    load_state_checked(model, state, path)
    model.pretrained_glance_head = same_classes and source.pretrained_glance_head
    return fresh


def class_sized_layers(model) -> list[str]:
    """Names of the layers whose output is one value per class."""
    heads = [f"{name}.backbone.{head}" for name in ("glance_encoder", "focus_encoder")
             for head, module in getattr(model, name).backbone.named_modules()
             if module is getattr(model, name).head and head]
    outputs = [f"classifier.{name}" for name, module in model.classifier.named_children()
               if isinstance(module, nn.Linear)]
    return heads + outputs


def check_same_run(stored: dict, current: dict, path) -> None:
    """Refuse to resume with a configuration other than the run's, naming the keys that differ.
    Keys the run's configuration lacks (it was written by an earlier version, which had no such
    setting) are not compared."""
    differences = [key for key in _differing_keys(stored, current) if key not in MAY_DIFFER_ON_RESUME]
    if differences:
        shown = "; ".join(f"{key}: {_lookup(stored, key)!r} in the run, {_lookup(current, key)!r} now"
                          for key in differences[:5])
        raise ConfigError(f"cannot resume from '{path}' with a different configuration ({shown}). "
                          "Resume with the run's own settings (RUN/config.yaml), or start a new "
                          "run in another train.out_dir")


def _differing_keys(stored: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(stored) | set(current)):
        if key not in stored:
            continue  # a setting newer than the run
        path = f"{prefix}{key}"
        left, right = stored.get(key), current.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _differing_keys(left, right, f"{path}.")
        elif left != right:
            keys.append(path)
    return keys


def _lookup(data: dict, dotted: str) -> Optional[object]:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def resume_changes(stored: dict, current: dict, training: dict, stage: int,
                   world_size: int) -> list[str]:
    """What a resumed stage does differently from the run it continues: another length (its
    schedule) or another number of processes. One sentence each; none when nothing changes."""
    changes = []
    section = "one_stage" if stage == ONE_STAGE else f"stage{stage}"
    for key in ("epochs", "updates"):
        was = _lookup(stored, f"train.{section}.{key}")
        now = _lookup(current, f"train.{section}.{key}")
        if was is None or was == now:
            continue
        if key == "epochs" and stage != 2:
            changes.append(
                f"train.{section}.epochs was {was} in the run and is {now} now: the cosine "
                f"learning-rate schedule follows the new length from epoch {training['epoch'] + 1} "
                "on (its rate jumps to where the new schedule is at that epoch)")
        else:
            changes.append(f"train.{section}.{key} was {was} in the run and is {now} now: stage 2 "
                           "runs to the new count of PPO updates (the policy's standard deviation "
                           "schedule, if any, follows it)")
    was = training.get("world_size")
    if was is not None and was != world_size:
        batch = _lookup(current, "train.batch_size")
        changes.append(
            f"the run trained on {was} process(es) and resumes on {world_size}: the effective "
            f"batch stays {batch}, each process's share changes from {batch // max(was, 1)} to "
            f"{batch // max(world_size, 1)} images, the batches are drawn in another order from "
            "here on, and stage 2's updates per epoch follow the new shards")
    return changes
