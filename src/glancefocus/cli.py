"""The `glancefocus` command. Each subcommand lives in its own module, which registers itself
with `register(subparsers)`; errors the user can fix print one line, without a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# modules that add a subcommand: each has register(subparsers)
COMMAND_MODULES = [
    "glancefocus.cli",            # macs, convert, presets (below)
    "glancefocus.train.command",  # train
    "glancefocus.demo",           # demo
    "glancefocus.evaluate",       # evaluate
    "glancefocus.predict",        # predict
]


def register(subparsers) -> None:
    p = subparsers.add_parser("macs", help="multiply-adds per part and per step of a GFNet")
    p.add_argument("--arch", required=True, help="a preset (e.g. resnet50) or any timm CNN name")
    p.add_argument("--patch-size", type=int, default=None, help="P (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="T, glance included (default: the preset's)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the preset's, 1000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side; MACs do not depend on it, it is only checked against P")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_macs)

    p = subparsers.add_parser("convert", help="convert a checkpoint (e.g. an authors' *.pth.tar) "
                              "to the native safe format")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling SRC (the authors' files are PyTorch 1.3 pickles, which "
                        "can run code when loaded): only for files you trust")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("presets", help="list the named configurations")
    p.set_defaults(func=_cmd_presets)


def _cmd_macs(args) -> int:
    from .model import create_model

    model = create_model(args.arch, num_classes=args.num_classes, patch_size=args.patch_size,
                         max_steps=args.steps, image_size=args.image_size)
    table = model.macs()
    if args.image_size is not None:
        table["image_size"] = args.image_size
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"{table['arch']}  P={table['patch_size']}  T={table['max_steps']}  "
          f"classes={table['num_classes']}")
    print(f"  encoder     {table['encoder']:>16,}")
    print(f"  policy      {table['policy']:>16,}")
    print(f"  classifier  {table['classifier']:>16,}"
          + ("" if len(set(table["classifier_per_step"])) == 1
             else f"  (per step: {', '.join(f'{c:,}' for c in table['classifier_per_step'])})"))
    print("  steps  cumulative MACs")
    for k, macs in enumerate(table["per_step"], start=1):
        print(f"  {k:>5}  {macs:>16,}")
    return 0


def _cmd_convert(args) -> int:
    from .checkpoint import convert

    model = convert(args.src, args.dst, trust_pickle=args.trust_pickle)
    print(f"wrote {args.dst}: {model.config.arch}, {model.config.num_classes} classes, "
          f"P={model.config.patch_size}, T={model.config.max_steps}"
          + (", with calibrated exit thresholds" if model.exit_curve else ""))
    return 0


def _cmd_presets(args) -> int:
    from .presets import get_preset, preset_names

    for name in preset_names():
        model = get_preset(name)["model"]
        print(f"{name:<24} arch={model['arch']:<24} classifier={model.get('classifier')} "
              f"P={model.get('patch_size', 96)} T={model.get('max_steps', 5)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glancefocus", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a subcommand that is not part of this installation
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .interrupts import TrainingInterrupted

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as exc:  # SIGINT / SIGTERM during training, checkpoint saved
        print(f"glancefocus {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"glancefocus {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
