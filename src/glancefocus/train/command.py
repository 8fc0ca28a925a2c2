"""`glancefocus train`: resolve the run configuration and run the stages."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional

from ..config import ConfigError, RunConfig, deep_merge, load_config, read_config_file
from ..presets import assumed_num_classes, get_preset


def register(subparsers) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "train", help="train a GFNet (three stages, or one with train.recipe=one-stage)",
        formatter_class=HelpFormatter,
        description="Train a GFNet into train.out_dir. The paper's recipe has three stages: "
                    "stage 1 trains the encoders and classifier on random patches, stage 2 the "
                    "patch policy with PPO, stage 3 fine-tunes with the policy's patches. "
                    "train.recipe=one-stage trains all of them together in one run, a PPO update "
                    "of the policy after every classifier step. Under `torchrun "
                    "--nproc_per_node N` the same command trains on N processes (DDP).")
    p.add_argument("--config", metavar="FILE",
                   help="YAML run configuration; it may name a base preset as `preset: NAME`")
    p.add_argument("--preset", metavar="NAME",
                   help="a named configuration to start from (see `glancefocus presets`)")
    p.add_argument("--stage", choices=["1", "2", "3", "all"], default="all",
                   help="which stage of the three-stage recipe to run (default: all, in order)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue from RUN/stageN/last.pt (RUN/one-stage/last.pt) where a run "
                        "stopped. With a run folder RUN, its own saved configuration "
                        "(RUN/config.yaml) is the configuration (overrides still apply, e.g. "
                        "more epochs); alone, the configuration given (train.out_dir) names it")
    p.add_argument("--init", metavar="CKPT",
                   help="start the first stage run from this GFNet checkpoint instead of the "
                        "previous stage's result in the run folder; it may have another class "
                        "count (its class-sized layers then start fresh)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="let --init read an authors' *.pth.tar release file (a full pickle, "
                        "which can run code when loaded): only for files you trust")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a run folder that holds checkpoints, replacing them")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved run configuration (and the stage lengths it gives "
                        "on this data) and exit without training")
    p.add_argument("--save-every", type=int, default=200, metavar="N",
                   help="stage 2: also write last.pt every N PPO updates (default: 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.batch_size=64 model.pretrained=true")
    p.set_defaults(func=_cmd_train)


FINE_TUNE_LENGTH = 1 / 6
"""A fine-tune from a GFNet (--init) runs this share of the recipe's epochs (at least 1)..."""
FINE_TUNE_LR = 0.1
"""...at this share of its learning rates: the encoders, classifier and policy start trained."""


def fine_tune_schedule(config: RunConfig) -> dict:
    """The fine-tuning schedule of `config`'s recipe, as dotted keys: shorter stages, lower
    learning rates, stage 2's PPO updates sized from the dataset (see StageConfig.updates)."""
    schedule = {}
    for section in ("stage1", "stage3", "one_stage"):
        settings = getattr(config.train, section)
        schedule[f"train.{section}.epochs"] = max(1, math.ceil(settings.epochs * FINE_TUNE_LENGTH))
        schedule[f"train.{section}.backbone_lr"] = settings.backbone_lr * FINE_TUNE_LR
        schedule[f"train.{section}.classifier_lr"] = settings.classifier_lr * FINE_TUNE_LR
    schedule["train.stage2.updates"] = "auto"
    return schedule


def resolve_config(config_file: Optional[str], preset: Optional[str],
                   overrides: list[str], fine_tune: bool = False) -> RunConfig:
    """The preset (from --preset or the file's `preset:` key), then the file, then overrides.
    fine_tune: the fine-tuning schedule (fine_tune_schedule) replaces the preset's, for every
    key the file and the overrides leave alone."""
    file_data = read_config_file(config_file) if config_file else {}
    file_preset = file_data.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"config key 'preset' must name a preset, got {file_preset!r}")
    if preset and file_preset and preset != file_preset:
        raise ConfigError(f"--preset {preset} contradicts `preset: {file_preset}` in {config_file}")
    name = preset or file_preset
    base = deep_merge(get_preset(name) if name else {}, file_data)
    config = load_config(None, overrides, base=base)
    if not fine_tune:
        return config
    chosen = set(_dotted_keys(file_data)) | {item.split("=", 1)[0].strip() for item in overrides}
    schedule = [f"{key}={value}" for key, value in fine_tune_schedule(config).items()
                if key not in chosen]
    return load_config(None, schedule + list(overrides), base=base)


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys += (_dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict)
                 else [f"{prefix}{key}"])
    return keys


def _resume_argument(value, overrides: list[str]):
    """(False, True or the run folder, overrides) from --resume [RUN]: a key=value that is no
    folder, taken by --resume's optional RUN, goes back to the overrides."""
    if value is True or value is False:
        return value, overrides
    if "=" in value and not Path(value).is_dir():
        return True, [value, *overrides]
    folder = Path(value)
    if not (folder / "config.yaml").is_file():
        raise ValueError(f"--resume {value}: '{folder / 'config.yaml'}' does not exist (a run "
                         "folder of `glancefocus train` holds its configuration there)")
    return folder, overrides


def run_config(folder: Path, overrides: list[str]) -> RunConfig:
    """The configuration saved in run folder `folder`, with `overrides`; train.out_dir is the
    folder (wherever it was when the run started)."""
    return load_config(None, [f"train.out_dir={folder}", *overrides],
                       base=read_config_file(str(folder / "config.yaml")))


def log_to_console() -> None:
    """Show the training log (INFO and up) on the console, on the current sys.stderr (a
    handler from an earlier call, bound to an older stream, is replaced)."""
    logger = logging.getLogger("glancefocus")
    for old in [h for h in logger.handlers if getattr(h, "glancefocus_console", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler()
    handler.glancefocus_console = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _cmd_train(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import train

    resume, overrides = _resume_argument(args.resume, args.overrides)
    if isinstance(resume, Path):
        if args.config or args.preset or args.init:
            raise ValueError(f"--resume {resume} continues the run's own configuration "
                             f"({resume / 'config.yaml'}): drop --config, --preset and --init "
                             "(key=value overrides still apply)")
        config = run_config(resume, overrides)
    else:
        config = resolve_config(args.config, args.preset, overrides,
                                fine_tune=bool(args.init) and not resume)
    if args.save_every < 1:
        raise ValueError(f"--save-every must be >= 1, got {args.save_every}")
    if args.print_config:
        note = ""
        if args.init and not resume:
            note = ("# --init: the fine-tuning schedule (a sixth of the recipe's epochs, a tenth "
                    "of its learning rates, stage 2's updates sized from the data) where no "
                    "key=value or file sets them\n")
        print(describe_recipe(config) + note, end="")
        return 0
    stages = None if args.stage == "all" else (int(args.stage),)
    log_to_console()
    with logging_redirect_tqdm(loggers=[logging.getLogger("glancefocus")]):
        train(config, stages, resume=bool(resume), init=args.init, progress=not args.no_progress,
              save_every=args.save_every, trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    return 0


def describe_recipe(config: RunConfig) -> str:
    """The resolved configuration as YAML, then what it gives on its data: classes, images,
    optimiser steps per stage and stage 2's PPO updates (which follow the dataset's size)."""
    import yaml

    from ..config import to_dict
    from ..data import build_datasets
    from .one_stage import focus_fraction
    from .stages import with_class_count, with_ppo_updates

    try:
        train_set, _, classes = build_datasets(config.data, config.model.in_chans)
    except (ValueError, OSError) as exc:
        note = f"# the data could not be read, so its sizes are not shown: {exc}\n"
        if config.model.num_classes is None:
            classes_assumed = assumed_num_classes(config)
            note += (f"# memory estimated for {classes_assumed} classes (set model.num_classes "
                     "for yours)\n")
            config = dataclasses.replace(config, model=dataclasses.replace(
                config.model, num_classes=classes_assumed))
        config, memory = _fitted(config)
        return yaml.safe_dump(to_dict(config), sort_keys=False) + note + memory
    config = with_ppo_updates(with_class_count(config, classes), len(train_set))
    config, memory = _fitted(config)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    batch = config.train.batch_size
    steps_per_epoch = math.ceil(len(train_set) / batch)
    head = [f"model.num_classes: {config.model.num_classes} (the data has {len(classes)} classes)",
            f"training images: {len(train_set)}, batch {batch}: {steps_per_epoch} steps per epoch"]
    if config.train.recipe == "one-stage":
        one = config.train.one_stage
        which = (" (those the glance is least sure of)" if one.focus_on == "uncertain"
                 else "")
        end = focus_fraction(one, one.epochs - 1)
        share = (f"{one.focus_fraction:.0%}" if end == one.focus_fraction else
                 f"{one.focus_fraction:.0%} (first epoch) to {end:.0%} (last)")
        focus = ("" if min(one.focus_fraction, end) >= 1 else
                 f"; the focus steps on {share} of each batch{which}")
        updates = one.epochs * math.ceil(steps_per_epoch / one.ppo_every)
        every = "one every step" if one.ppo_every == 1 else f"one every {one.ppo_every} steps"
        if one.ppo_min_rollout:
            policy = (f"and at most {updates} PPO updates of the policy ({every}, once their "
                      f"rollout holds {one.ppo_min_rollout} images)")
        elif one.ppo_every == 1:
            policy = "each followed by a PPO update of the policy"
        else:
            policy = f"and {updates} PPO updates of the policy ({every})"
        lines = head + [f"one-stage: {one.epochs} epochs = {one.epochs * steps_per_epoch} SGD "
                        f"steps, {policy}{focus}"]
    else:
        stage2 = config.train.stage2
        updates = stage2.updates or stage2.epochs * steps_per_epoch
        lines = head + [
            f"stage 1: {config.train.stage1.epochs} epochs = "
            f"{config.train.stage1.epochs * steps_per_epoch} SGD steps",
            f"stage 2: {updates} PPO updates" + ("" if stage2.updates else
                                                 f" ({stage2.epochs} epochs; set "
                                                 "train.stage2.updates=N to fix the count)"),
            f"stage 3: {config.train.stage3.epochs} epochs = "
            f"{config.train.stage3.epochs * steps_per_epoch} SGD steps"]
    return text + "# on this data:\n" + "".join(f"#   {line}\n" for line in lines) + memory



def _fitted(config: RunConfig) -> tuple[RunConfig, str]:
    """`config` fitted to this machine's device as a run would be (fit.py), and a comment
    line with the choice and its estimate."""
    from .fit import fit_to_device
    from .runtime import pick_device

    device = pick_device(config.train.device, 0)
    config, choice = fit_to_device(config, device)
    return config, f"# {choice.line(device, config.train.batch_size)}\n"
