"""Interrupted training: real `glancefocus train` processes killed (SIGKILL) or stopped (SIGTERM,
SIGINT) at seeded random moments, then resumed; plus non-finite PPO losses.

A whole tiny run takes about 6 s on 2 CPU cores (half of it importing torch).
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from test_train import TINY, assert_same_weights, tiny_config, weights

from glancefocus.atomic import atomic_path
from glancefocus.checkpoint import read_checkpoint
from glancefocus.interrupts import TrainingInterrupted
from glancefocus.train import policy_stage, train
from glancefocus.train.context import StageRun
from glancefocus.train.faults import NonFiniteLossError

# stage 2 has 6 batches per epoch: 14 updates cross two epoch ends, saved every 4 updates
SETTINGS = TINY + ["data.train_canvases=192", "train.stage1.epochs=3", "train.stage2.updates=14",
                   "train.stage3.epochs=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def start(out_dir, resume=False):
    command = [sys.executable, "-m", "glancefocus.cli", "train", "--preset", "demo",
               "--no-progress", "--save-every", "4", *SETTINGS, f"train.out_dir={out_dir}"]
    if resume:
        command.append("--resume")
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process, timeout=120):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def can_resume(out_dir):
    return any((Path(out_dir) / f"stage{s}" / "last.pt").exists() for s in (1, 2, 3))


def check_checkpoints_load(out_dir):
    """Every checkpoint present reads whole; temporary files are never named *.pt."""
    for path in Path(out_dir).rglob("*.pt"):
        assert not path.name.startswith("."), path
        read_checkpoint(path)  # raises on a truncated or corrupt file


def assert_same_final_weights(reference, run):
    for stage in (1, 2, 3):
        assert_same_weights(weights(reference / f"stage{stage}" / "last.pt"),
                            weights(run / f"stage{stage}" / "last.pt"))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, as the subprocesses (OMP_NUM_THREADS=1): two threads on
    two busy cores can be ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    code, output = finish(start(out))
    assert code == 0, output[-3000:]
    return out


def test_sigkill_at_random_moments_then_resume(reference, tmp_path):
    # a run spends ~2.5 s importing, then ~3 s training: kill somewhere in the training
    rng = random.Random(5)
    delays = [round(rng.uniform(2.6, 4.6), 2) for _ in range(3)]
    killed = 0
    for delay in delays:
        process = start(tmp_path, resume=can_resume(tmp_path))
        time.sleep(delay)
        process.kill()
        code, output = finish(process)
        assert code in (-signal.SIGKILL, 0), output[-3000:]
        killed += code == -signal.SIGKILL
        check_checkpoints_load(tmp_path)
        print(f"killed after {delay} s:", sorted(
            (p.parent.name, p.name, (read_checkpoint(p)["training"] or {}).get("update"),
             (read_checkpoint(p)["training"] or {}).get("epoch")) for p in tmp_path.rglob("*.pt")))
    assert killed >= 1  # (a resumed run has less left to do: a kill may come after its end)
    code, output = finish(start(tmp_path, resume=can_resume(tmp_path)))
    assert code == 0, output[-3000:]
    check_checkpoints_load(tmp_path)
    assert_same_final_weights(reference, tmp_path)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_then_resume_matches(reference, tmp_path, signum, status):
    process = start(tmp_path)
    # wait for the first epoch's checkpoint: the signal then lands mid-run
    first = tmp_path / "stage1" / "last.pt"
    deadline = time.time() + 60
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    code, output = finish(process)
    assert code == status, output[-3000:]
    last_line = output.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(signum).name}" in last_line and "--resume" in last_line
    check_checkpoints_load(tmp_path)
    code, output = finish(start(tmp_path, resume=True))
    assert code == 0, output[-3000:]
    assert_same_final_weights(reference, tmp_path)
    assert not list(tmp_path.rglob("interrupted.pt"))  # superseded by the later last.pt


def test_interrupted_write_keeps_the_old_file(tmp_path):
    # a second Ctrl-C while a checkpoint is written: the old file stays, no temporary is left
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stage1_stopped_mid_epoch_saves_interrupted_weights(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "train.stage1.epochs=2")
    calls = {"n": 0}

    def stop_in_epoch_2(self):
        # asked after each of an epoch's 3 batches, after the epoch and after its save:
        # the 7th question comes after the 2nd batch of epoch 2
        calls["n"] += 1
        if calls["n"] == 7:
            self.stop_flag.signum = signal.SIGTERM
        return self.stop_flag.requested

    monkeypatch.setattr(StageRun, "stop_requested", stop_in_epoch_2)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, stages=[1], progress=False)
    assert stopped.value.exit_status == 143
    folder = tmp_path / "stage1"
    assert read_checkpoint(folder / "last.pt")["training"]["epoch"] == 1  # the exact resume point
    saved = read_checkpoint(folder / "interrupted.pt")
    assert saved["training"]["interrupted"] and saved["training"]["epoch"] == 1
    last = weights(folder / "last.pt")  # interrupted.pt holds the two batches' progress
    assert any(not torch.equal(last[key], value) for key, value in saved["state_dict"].items())


# ----------------------------------------------------------------------------------------------
# non-finite PPO losses: a NaN reward makes every loss of its update NaN

def _nan_first_rollout(monkeypatch):
    real = policy_stage.collect_rollout
    calls = {"n": 0}

    def collect(*args, **kwargs):
        rollout = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            rollout.true_probs = rollout.true_probs * float("nan")
        return rollout

    monkeypatch.setattr(policy_stage, "collect_rollout", collect)


@pytest.fixture(scope="module")
def stage1_done(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    train(tiny_config(out, "train.stage1.epochs=1"), stages=[1], progress=False)
    torch.set_num_threads(threads)
    return out / "stage1" / "last.pt"


def test_nan_rewards_skip_ppo_steps(stage1_done, tmp_path, monkeypatch):
    _nan_first_rollout(monkeypatch)
    config = tiny_config(tmp_path, "train.max_nonfinite=100")
    train(config, stages=[2], init=str(stage1_done), progress=False)
    state = read_checkpoint(tmp_path / "stage2" / "last.pt")
    assert state["training"]["nonfinite"] == config.train.stage2.ppo_epochs  # one update's steps
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


def test_too_many_nan_ppo_losses_stop_without_saving(stage1_done, tmp_path, monkeypatch):
    _nan_first_rollout(monkeypatch)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite=0"):
        train(tiny_config(tmp_path, "train.max_nonfinite=0"), stages=[2], init=str(stage1_done),
              progress=False)
    assert not (tmp_path / "stage2" / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# starts that cannot work say why

def test_resume_with_nothing_to_resume(tmp_path):
    # e.g. a run stopped in its first epoch: its message says to run again without --resume
    with pytest.raises(FileNotFoundError, match="holds no checkpoint of stage"):
        train(tiny_config(tmp_path), resume=True, progress=False)


def test_class_count_of_data_and_model_differ(tmp_path):
    with pytest.raises(ValueError, match="set model.num_classes=10"):
        train(tiny_config(tmp_path, "model.num_classes=5"), stages=[1], progress=False)
