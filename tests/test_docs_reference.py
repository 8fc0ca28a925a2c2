"""The generated reference pages of the docs site (docs/hooks.py) cover every configuration key
and every subcommand; checked without MkDocs."""
import dataclasses
import importlib.util
from pathlib import Path

from glancefocus.cli import COMMAND_MODULES
from glancefocus.config import RunConfig

HOOKS = Path(__file__).resolve().parent.parent / "docs" / "hooks.py"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_keys(instance, prefix=""):
    """Every key a user can set, found on the dataclasses themselves."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


def test_config_page_lists_every_key_with_type_default_and_doc():
    hooks = load_hooks()
    page = hooks.config_reference()
    keys = list(leaf_keys(RunConfig()))
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"keys missing from the configuration page: {missing}"
    rows = {row.split(" | ")[0].strip("| `"): row for row in page.splitlines()
            if row.startswith("| `")}
    assert len(rows) == len(keys)
    assert rows["train.stage2.epochs"].split(" | ")[1:3] == ["`int`", "`15`"]  # its own default
    assert "Classes to predict" in rows["model.num_classes"]  # the field's docstring
    # a section added to the configuration gets its own table
    assert "## train.one_stage" in page and "## model" in page


def test_cli_page_holds_every_subcommands_help():
    page = load_hooks().cli_reference()
    for commands in COMMAND_MODULES.values():
        for command in commands:
            assert f"## glancefocus {command}\n" in page, command
            assert f"usage: glancefocus {command}" in page, command


def test_markers_are_replaced():
    hooks = load_hooks()
    page = hooks.on_page_markdown("# Configuration\n\n<!-- generated: config -->\n", None, None,
                                  None)
    assert "<!-- generated" not in page and "| `model.arch` |" in page
