"""A run folder on a full or read-only disk: one line naming the path, the last checkpoint whole."""
import errno
import os
import subprocess
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import glancefocus.atomic
from glancefocus.atomic import WriteFailed, write_text
from glancefocus.checkpoint import load_checkpoint, read_checkpoint
from glancefocus.cli import main

# the tiny cluttered-MNIST run of tests/test_train.py, through the command line
TINY = ["data.canvas_size=48", "data.image_size=48", "model.patch_size=16", "data.num_clutter=2",
        "data.train_canvases=64", "data.test_canvases=32", "train.batch_size=32",
        "model.classifier_hidden=16", "model.policy_hidden=16", "data.num_workers=0",
        "train.stage1.epochs=2"]


def train_stage1(out_dir, capsys):
    status = main(["train", "--preset", "demo", "--stage", "1", "--no-progress",
                   f"train.out_dir={out_dir}", *TINY])
    return status, capsys.readouterr().err


def test_read_only_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                        monkeypatch):
    """The second epoch's checkpoint cannot be written (EROFS from the rename)."""
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("last.pt") and sum(str(c).endswith("last.pt") for c in calls) > 1:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(glancefocus.atomic.os, "replace", replace)
    status, err = train_stage1(tmp_path / "run", capsys)
    last = tmp_path / "run" / "stage1" / "last.pt"
    assert status == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert lines == [f"glancefocus train: error: cannot write '{last}': the file system is "
                     "read-only"]
    assert "Traceback" not in err
    assert read_checkpoint(last)["training"]["epoch"] == 1  # the first epoch's, whole
    assert not list(last.parent.glob(".last.pt.*"))  # no temporary file left behind


def test_write_failure_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "notes.txt"
    write_text(target, "old")

    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(glancefocus.atomic.Path, "write_text", full)
    with pytest.raises(WriteFailed, match=f"cannot write '{target}': the disk is full"):
        write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)  # lazy: files may be open


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_disk, capsys):
    """A real full disk: the demo model's checkpoint (~2 MB) fits once, not twice."""
    status, err = train_stage1(tiny_disk / "run", capsys)
    assert status == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot write" in errors[0] and str(tiny_disk) in errors[0]
    assert "Traceback" not in err
    last = tiny_disk / "run" / "stage1" / "last.pt"
    if last.exists():  # whatever was written before the disk filled up is whole
        model = load_checkpoint(last)
        assert model(torch.zeros(1, 1, 48, 48)).logits.isfinite().all()
