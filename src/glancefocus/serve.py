"""`glancefocus serve EXPORTED_DIR`: the same server as `glancefocus-serve` (the runtime's,
glancefocus_runtime.server), for those who installed the training package."""
from __future__ import annotations

from .cli import HelpFormatter


def register(subparsers) -> None:
    from glancefocus_runtime.server.cli import DESCRIPTION, add_arguments

    p = subparsers.add_parser("serve", help="serve an exported model over HTTP (batching, early "
                              "exit)", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from glancefocus_runtime.server.cli import serve

    return serve(args)
