"""The `glancefocus` command (also `python -m glancefocus`).

Errors the user can fix print one line, without a traceback, and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import warnings

DESCRIPTION = """\
Glance and Focus Networks (GFNet): image classifiers that glance at a shrunk copy of the image
(step 1), then focus on a few full-resolution patches (steps 2..T), and stop as soon as they are
confident. Train one on your image folders, evaluate its accuracy at compute budgets, and
classify images with early exit.

Run `glancefocus COMMAND --help` for a command's options (each shows its default)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help already says it; flags are 'off'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or action.default is argparse.SUPPRESS):
            return text
        shown = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


# terminal control sequences (colours, bold) that torch puts into some of its messages
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def one_line(message) -> str:
    """`message` without terminal escape codes, its lines joined: one line on the terminal."""
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", str(message)).splitlines()]
    return " ".join(line for line in lines if line)

# modules that add subcommands (each has register(subparsers)), with the commands they add
COMMAND_MODULES = {
    "glancefocus.train.command": ("train",),
    "glancefocus.train.memory_command": ("memory",),
    "glancefocus.evaluate": ("evaluate",),
    "glancefocus.predict": ("predict",),
    "glancefocus.export.command": ("export",),
    "glancefocus.demo": ("demo",),
    "glancefocus.serve": ("serve",),
    "glancefocus.cli": ("macs", "convert", "presets"),  # below
}


def register(subparsers) -> None:
    p = subparsers.add_parser("macs", help="multiply-adds per part and per step of a GFNet",
                              description="Multiply-adds (MACs) of a GFNet, counted from its "
                              "modules: per encoder, policy and classifier, and of running 1..T "
                              "steps (step 1 = the glance).", formatter_class=HelpFormatter)
    p.add_argument("--arch", required=True,
                   help="a preset (e.g. resnet50, demo_vit) or a timm network name: a CNN with a "
                        "spatial feature map or a vision transformer (ViT, DeiT, Swin)")
    p.add_argument("--patch-size", type=int, default=None, metavar="P",
                   help="patch side P in pixels (default: the preset's, else 96)")
    p.add_argument("--steps", type=int, default=None, metavar="T",
                   help="steps T, the glance included (default: the preset's, else 5)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: the preset's, else 1000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels; MACs do not depend on it, it is only checked "
                        "against P (default: not checked)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_macs)

    p = subparsers.add_parser("convert", help="turn a checkpoint (e.g. an authors' *.pth.tar) into "
                              "the safe native format", formatter_class=HelpFormatter)
    p.add_argument("src", help="the checkpoint to read (native, or an authors' *.pth.tar)")
    p.add_argument("dst", help="the native checkpoint to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling SRC (the authors' files are PyTorch 1.3 pickles, which "
                        "can run code when loaded): only for files you trust")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("presets", help="list the named configurations",
                              formatter_class=HelpFormatter)
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
    parser = argparse.ArgumentParser(prog="glancefocus", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True,
                                       metavar="COMMAND")
    for name, commands in COMMAND_MODULES.items():
        try:
            module = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # a subcommand that is not part of this installation
            # a dependency missing here (e.g. PyTorch where only the ONNX runtime is installed):
            # the other commands still work, and these say what they need when run
            for command in commands:
                _register_unavailable(subparsers, command, exc)
            continue
        module.register(subparsers)
    return parser


def _register_unavailable(subparsers, command: str, exc: ModuleNotFoundError) -> None:
    message = (f"needs the '{exc.name}' package, which cannot be imported here (pip install "
               f"glancefocus's dependencies, e.g. torch)")
    # no option prefix: every argument, --help included, lands in `ignored` and the command
    # answers with the message
    p = subparsers.add_parser(command, help=f"(unavailable: {message})", add_help=False,
                              prefix_chars="\0")
    p.add_argument("ignored", nargs="*")

    def unavailable(args):
        raise ValueError(message)

    p.set_defaults(func=unavailable)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .interrupts import TrainingInterrupted

    try:
        with warnings.catch_warnings():
            _print_own_warnings(args.command)
            return int(args.func(args) or 0)
    except TrainingInterrupted as exc:  # SIGINT / SIGTERM during training, checkpoint saved
        print(f"glancefocus {args.command}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`glancefocus presets | head`): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 141
    except (ValueError, OSError, KeyError) as exc:  # OSError: missing files, full disks, ...
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"glancefocus {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2


def _print_own_warnings(command: str) -> None:
    """Inside catch_warnings: glancefocus's own warnings print as one line each, like errors;
    other libraries' warnings keep Python's format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("glancefocus"):
            print(f"glancefocus {command}: warning: {one_line(message)}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
