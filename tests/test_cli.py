"""The `glancefocus` command itself: help texts, one-line errors, `python -m glancefocus`."""
import argparse
import os
import subprocess
import sys

import pytest

from glancefocus import cli
from glancefocus.cli import build_parser, main, one_line

# the subcommands whose options this file checks (train has its own module and tests)
COMMANDS = ("evaluate", "predict", "demo", "macs", "convert", "presets")


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_help_line_that_shows_its_default(command):
    _, choices = subparsers()
    sub = choices[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest}: no help text"
        if action.option_strings and not action.required:
            shown = sub.formatter_class("x")._get_help_string(action)
            assert "default" in shown, f"{command} {action.option_strings[0]}: default not shown"
    text = sub.format_help()
    assert "(default: None)" not in text
    if command == "evaluate":
        assert "--device DEVICE" in text and "(default: auto)" in text
        assert "--in-place" in text and "--budget MACS" in text
    if command == "predict":
        assert "(default: auto)" in text and "--top-k K" in text and "original" in text


def test_top_level_help_describes_the_commands_for_users():
    parser, choices = subparsers()
    text = parser.format_help()
    assert "registers itself" not in text and "module" not in text
    for command in ("train", "evaluate", "predict", "demo", "macs", "convert", "presets"):
        if command in choices:
            assert f"  {command} " in text


def test_errors_lose_terminal_colours_and_fit_on_one_line(monkeypatch, capsys):
    def fails(args):
        raise ValueError("\x1b[1mWeights only load failed\x1b[0m.\n  \x1b[31mdetail\x1b[0m here")

    monkeypatch.setattr(cli, "_cmd_presets", fails)
    assert main(["presets"]) == 2
    err = capsys.readouterr().err
    assert err == "glancefocus presets: error: Weights only load failed. detail here\n"
    assert one_line("a\x1b]8;;http://x\x07link\x1b]8;;\x07\n\nb") == "alink b"


def test_own_warnings_print_as_one_line(monkeypatch, capsys):
    from glancefocus import exits

    def warns(args):
        exits.budget_index({"macs": [1.0, 2.0], "accuracy": [1.0, 2.0],
                            "thresholds": [[0.0], [0.0]]}, 9.0)
        return 0

    monkeypatch.setattr(cli, "_cmd_presets", warns)
    assert main(["presets"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("glancefocus presets: warning: the budget of 9 MACs per image is above")


def test_macs_of_a_transformer_counts_it_or_says_why_not(capsys):
    """A ViT is counted (attention included); a patch size its patches cannot tile is a one-line
    error, not a traceback."""
    assert main(["macs", "--arch", "vit_tiny_patch16_224", "--patch-size", "96"]) == 0
    assert "208,028,160" in capsys.readouterr().out
    assert main(["macs", "--arch", "vit_tiny_patch16_224", "--patch-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "do not tile a 100x100 input" in err
    assert err.startswith("glancefocus macs: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_python_dash_m_runs_the_command():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "glancefocus", "presets"], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "resnet50" in done.stdout and "demo" in done.stdout
    done = subprocess.run([sys.executable, "-m", "glancefocus", "macs", "--help"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0 and "usage: glancefocus macs" in done.stdout
