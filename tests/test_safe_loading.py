"""Every command that takes a checkpoint refuses a crafted pickle that would run code, with a
one-line error and no traceback, unless the user opts in with --trust-pickle."""
import numpy as np
import pytest
from PIL import Image

from glancefocus.cli import main


def _image(tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(path)
    return str(path)


COMMANDS = {
    "predict": lambda ckpt, tmp: ["predict", _image(tmp), "--checkpoint", str(ckpt)],
    "evaluate": lambda ckpt, tmp: ["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp / "ev")],
    "convert": lambda ckpt, tmp: ["convert", str(ckpt), str(tmp / "out.pt")],
    "train --resume": lambda ckpt, tmp: ["train", "--preset", "demo", "--stage", "1", "--resume",
                                         "--no-progress", f"train.out_dir={tmp / 'run'}"],
    "train --init": lambda ckpt, tmp: ["train", "--preset", "demo", "--stage", "2", "--init",
                                       str(ckpt), "--no-progress", f"train.out_dir={tmp / 'run2'}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_refuse_a_crafted_pickle(command, tmp_path, capsys, write_crafted_pickle):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "stage1" / "last.pt"  # also where `train --resume` looks
    write_crafted_pickle(ckpt, marker, format="glancefocus-checkpoint")
    code = main(COMMANDS[command](ckpt, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "--trust-pickle" in err or "trust_pickle" in err
    assert "last.pt" in err
    assert not marker.exists()
