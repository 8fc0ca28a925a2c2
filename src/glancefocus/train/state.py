"""The run folder and the training state stored in its checkpoints.

    RUN/config.yaml           the resolved configuration
    RUN/stageN/last.pt        the latest state of stage N (written at the end of every epoch, and
                              in stage 2 every few updates), what --resume continues from
    RUN/stageN/best.pt        the epoch with the best last-step evaluation accuracy
    RUN/stageN/interrupted.pt stages 1/3 stopped mid-epoch by SIGINT/SIGTERM: the weights then
    RUN/stageN/metrics.csv    one row per epoch (stage 2: per update)

Resuming checks that the configuration is the run's own: only the keys in MAY_DIFFER_ON_RESUME
may change (training length, data workers, the folder's name, the initial weights source).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..atomic import write_atomic, write_text
from ..checkpoint import check_compatible, load_state_checked, read_checkpoint, save_checkpoint
from ..config import ConfigError
from .runtime import capture_rng

MAY_DIFFER_ON_RESUME = frozenset(
    [f"train.stage{n}.{key}" for n in (1, 2, 3) for key in ("epochs", "updates")]
    + ["data.num_workers", "train.out_dir", "model.pretrained"])


def stage_folder(out_dir, stage: int) -> Path:
    return Path(out_dir) / f"stage{stage}"


def last_checkpoint(out_dir, stage: int) -> Path:
    return stage_folder(out_dir, stage) / "last.pt"


def training_state(stage: int, *, epoch: int, update: int, finished: bool, optimizer,
                   best_metric: float, nonfinite: int, scaler=None) -> dict:
    """What --resume needs: counters, optimiser (and AMP scaler), best metric, RNG states.

    The learning-rate schedule is a function of the epoch, so the epoch is its position.
    """
    return {
        "stage": stage, "epoch": epoch, "update": update, "finished": finished,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_metric": best_metric, "nonfinite": nonfinite, "rng": capture_rng(),
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


def load_weights(model, path, model_config) -> dict:
    """Load a native checkpoint's weights into `model` after checking it fits; its raw dict."""
    data = read_checkpoint(path)
    check_compatible(data, model_config, path)
    load_state_checked(model, data["state_dict"], path)
    return data


def check_same_run(stored: dict, current: dict, path) -> None:
    """Refuse to resume with a configuration other than the run's, naming the keys that differ."""
    differences = [key for key in _differing_keys(stored, current) if key not in MAY_DIFFER_ON_RESUME]
    if differences:
        shown = "; ".join(f"{key}: {_lookup(stored, key)!r} in the run, {_lookup(current, key)!r} now"
                          for key in differences[:5])
        raise ConfigError(f"cannot resume from '{path}' with a different configuration ({shown}). "
                          "Resume with the run's own settings (RUN/config.yaml), or start a new "
                          "run in another train.out_dir")


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _differing_keys(left, right, f"{path}.")
        elif left != right:
            keys.append(path)
    return keys


def _lookup(data: dict, dotted: str) -> Optional[object]:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
