"""MkDocs hooks (mkdocs.yml `hooks:`): the CLI and configuration reference pages are generated at
build time from the code itself, so they cannot fall behind it.

A page holds a marker line, `<!-- generated: cli -->` or `<!-- generated: config -->`, that is
replaced by the text `cli_reference()` or `config_reference()` returns. Both are plain functions
(no MkDocs import), so tests call them directly.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap

MARKERS = {"<!-- generated: cli -->": "cli_reference", "<!-- generated: config -->": "config_reference"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: put the generated text in place of each marker on the page."""
    for marker, function in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, globals()[function]())
    return markdown


# ----------------------------------------------------------------------------------------------
# the command line

def cli_reference(width: int = 100) -> str:
    """Every `glancefocus` subcommand's --help, as the parsers print it, one section each."""
    from glancefocus.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps at $COLUMNS: the same page everywhere
    try:
        parser = build_parser()
        parts = ["## glancefocus", "", _code(parser.format_help())]
        for name, subparser in _subcommands(parser).items():
            parts += [f"## glancefocus {name}", "", _code(subparser.format_help())]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _code(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```\n"


# ----------------------------------------------------------------------------------------------
# the configuration

def config_keys() -> list[dict]:
    """Every configuration key: {'key': 'train.stage1.epochs', 'type', 'default', 'doc'}, in the
    order of the dataclasses in glancefocus.config, nested sections after their parent's keys."""
    from glancefocus.config import RunConfig

    keys: list[dict] = []
    _walk(RunConfig(), "", keys)
    return keys


def _walk(instance, prefix: str, keys: list[dict]) -> None:
    docs = _attribute_docs(type(instance))
    sections = []
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            sections.append((value, key))
            continue
        keys.append({"key": key, "type": _type_name(field.type), "default": value,
                     "doc": docs.get(field.name, "")})
    for value, key in sections:
        _walk(value, f"{key}.", keys)


def _attribute_docs(cls) -> dict:
    """{field: docstring} from the string literal under each field in the class bodies (the
    class's own and its dataclass bases')."""
    docs: dict = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _type_name(annotation) -> str:
    if isinstance(annotation, str):  # `from __future__ import annotations`
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def config_reference() -> str:
    """One table per section of the configuration: key, type, default and what it does."""
    lines: list[str] = []
    section = None
    for entry in config_keys():
        parent, _, name = entry["key"].rpartition(".")
        if parent != section:
            section = parent
            lines += ["", f"## {section}", "", "| key | type | default | what it does |",
                      "|---|---|---|---|"]
        doc = " ".join(entry["doc"].split()).replace("|", "\\|") or "-"
        default = _markdown_cell(repr(entry["default"]))
        kind = _markdown_cell(entry["type"])
        lines.append(f"| `{entry['key']}` | {kind} | {default} | {doc} |")
    return "\n".join(lines).lstrip() + "\n"


def _markdown_cell(text: str) -> str:
    """A code span (Python-Markdown's tables do not split a row at a pipe inside one)."""
    return f"`{text}`"


__all__ = ["cli_reference", "config_keys", "config_reference", "on_page_markdown"]
