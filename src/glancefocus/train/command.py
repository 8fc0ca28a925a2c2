"""`glancefocus train`: resolve the run configuration and run the stages."""
from __future__ import annotations

import logging
from typing import Optional

from ..config import ConfigError, RunConfig, deep_merge, load_config, read_config_file
from ..presets import get_preset


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a GFNet: stage 1 warm-up, stage 2 PPO policy, stage 3 fine-tune",
        description="Train a GFNet in three stages into train.out_dir. Under `torchrun "
                    "--nproc_per_node N` the same command trains on N processes (DDP).")
    p.add_argument("--config", metavar="FILE",
                   help="YAML run configuration; it may name a base preset as `preset: NAME`")
    p.add_argument("--preset", metavar="NAME",
                   help="a named configuration to start from (see `glancefocus presets`)")
    p.add_argument("--stage", choices=["1", "2", "3", "all"], default="all",
                   help="which stage to run (default: all three in order)")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN/stageN/last.pt where a run stopped")
    p.add_argument("--init", metavar="CKPT",
                   help="start the first stage run from this checkpoint instead of the previous "
                        "stage's result in the run folder")
    p.add_argument("--save-every", type=int, default=200, metavar="N",
                   help="stage 2: also write last.pt every N PPO updates (default 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.batch_size=64 model.pretrained=true")
    p.set_defaults(func=_cmd_train)


def resolve_config(config_file: Optional[str], preset: Optional[str],
                   overrides: list[str]) -> RunConfig:
    """The preset (from --preset or the file's `preset:` key), then the file, then overrides."""
    file_data = read_config_file(config_file) if config_file else {}
    file_preset = file_data.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"config key 'preset' must name a preset, got {file_preset!r}")
    if preset and file_preset and preset != file_preset:
        raise ConfigError(f"--preset {preset} contradicts `preset: {file_preset}` in {config_file}")
    name = preset or file_preset
    base = deep_merge(get_preset(name) if name else {}, file_data)
    return load_config(None, overrides, base=base)


def log_to_console() -> None:
    """Show the training log (INFO and up) on the console, once."""
    logger = logging.getLogger("glancefocus")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _cmd_train(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import ALL_STAGES, train

    config = resolve_config(args.config, args.preset, args.overrides)
    if args.save_every < 1:
        raise ValueError(f"--save-every must be >= 1, got {args.save_every}")
    stages = ALL_STAGES if args.stage == "all" else (int(args.stage),)
    log_to_console()
    with logging_redirect_tqdm(loggers=[logging.getLogger("glancefocus")]):
        train(config, stages, resume=args.resume, init=args.init, progress=not args.no_progress,
              save_every=args.save_every)
    return 0
