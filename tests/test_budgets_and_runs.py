"""Budgets that hold on new images (--calibrate-on, data.holdout_fraction, the deviation
warning), the fine-tuning schedule of --init, and a run's own record (RUN/train.log,
--resume RUN). CPU, offline, tiny models and data."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from test_evaluate import TINY_MNIST, make_image_folder, tiny_demo_checkpoint
from test_train import TINY

from glancefocus import create_model, exits, save_checkpoint
from glancefocus.cli import main
from glancefocus.config import DataConfig, from_dict
from glancefocus.data import ClutteredMNIST, ImageFolderDataset, build_datasets


def test_calibrate_on_val_heldout_and_a_folder(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    tiny_demo_checkpoint(ckpt)
    results = {}
    for on in ("val",):
        out = tmp_path / on
        assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--batch-size",
                     "60", "--calibrate-on", on]) == 0
        results[on] = json.loads((out / "evaluation.json").read_text())
    val = results["val"]
    assert val["calibration"]["on"] == "val" and val["calibration"]["images"] == 120
    budgeted = val["budgeted"]
    steps_macs = val["macs_per_step"]
    for q, asked in zip(budgeted["budgets"], budgeted["requested_macs"]):
        shares = exits.target_shares(q, len(steps_macs)).double()
        assert asked == pytest.approx(float((shares * torch.tensor(steps_macs).double()).sum()))
    # calibrated on the evaluated images themselves, the realised MACs follow the request
    # (up to ties and the floor of each step's count)
    middle = [d for q, d in zip(budgeted["budgets"], budgeted["macs_deviation"]) if 0.25 <= q <= 1]
    assert max(abs(d) for d in middle) < 0.05
    # no held-out images in this run: a clear error
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h"),
                 "--calibrate-on", "heldout"]) == 2
    assert "data.holdout_fraction" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h"),
                 "--calibrate-on", str(tmp_path / "nowhere")]) == 2
    assert "train, val, heldout or a folder" in capsys.readouterr().err


def test_calibrate_on_a_folder_of_other_images(tmp_path):
    root = make_image_folder(tmp_path / "images")
    other = make_image_folder(tmp_path / "other", seed=5)
    torch.manual_seed(0)
    model = create_model("demo", in_chans=3, num_classes=3)
    data = dict(dataset="folder", root=str(root), image_size=48, resize_size=56)
    save_checkpoint(model, tmp_path / "m.pt", run_config={"data": data})
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(out),
                 "--calibrate-on", str(other / "val")]) == 0
    calibration = json.loads((out / "evaluation.json").read_text())["calibration"]
    assert calibration["images"] == 9 and str(other / "val") in calibration["what"]


def test_holdout_fraction_keeps_a_fixed_share_out_of_training(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=10)
    config = from_dict(DataConfig, dict(dataset="folder", root=str(root), image_size=48,
                                        resize_size=56, holdout_fraction=0.2))
    train, _, classes = build_datasets(config, 3)
    held = ImageFolderDataset(root, "train", config, train=False, classes=classes,
                              part="holdout")
    assert len(train) == 24 and len(held) == 6
    assert not {p for p, _ in train.samples} & {p for p, _ in held.samples}
    again, _, _ = build_datasets(config, 3)
    assert again.samples == train.samples
    mnist = from_dict(DataConfig, dict(TINY_MNIST, holdout_fraction=0.1))
    trained, held = ClutteredMNIST(mnist, "train"), ClutteredMNIST(mnist, "holdout")
    assert len(trained.digits) == 3600 and len(held.digits) == 400 and len(held) == 120


def test_the_warning_names_the_deviation_and_the_cure():
    from glancefocus.evaluate import budget_deviation_warning

    curve = {"budgets": [0.25, 0.5, 1.0], "macs_deviation": [-0.02, -0.18, 0.03]}
    text = budget_deviation_warning(curve, {"mode": "train", "on": "train",
                                            "what": "training images"})
    assert "-18.0%" in text and "q 0.5" in text and "--calibrate-on heldout" in text
    curve["macs_deviation"] = [0.01, -0.05, 0.02]
    assert budget_deviation_warning(curve, {"mode": "train", "on": "train"}) is None


def test_init_starts_a_fine_tuning_schedule(tmp_path, capsys):
    ckpt = tmp_path / "gfnet.pt"
    tiny_demo_checkpoint(ckpt)
    args = ["train", "--preset", "demo", "--init", str(ckpt), "--print-config",
            "data.train_canvases=640", "train.out_dir=" + str(tmp_path / "run")]
    assert main(args + ["train.stage3.epochs=4"]) == 0
    out = capsys.readouterr().out
    # the demo's 8 and 5 epochs -> 2 and 1 (a sixth, at least 1); its 0.05 learning rates / 10;
    # stage 2: max(100, two epochs of 5 batches) updates; a key given stays as given
    assert "stage 1: 2 epochs" in out and "stage 3: 4 epochs" in out
    assert "backbone_lr: 0.005" in out and "stage 2: 100 PPO updates" in out
    assert "updates: auto" not in out and "--init: the fine-tuning schedule" in out
    assert main(args[:3] + args[5:]) == 0  # without --init: the recipe's own
    out = capsys.readouterr().out
    assert "stage 1: 8 epochs" in out and "stage 2: 800 PPO updates" in out


def test_a_run_keeps_its_log_and_resumes_from_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    first = ["train", "--preset", "demo", "--stage", "1", "--no-progress", *TINY,
             "train.stage1.epochs=1", f"train.out_dir={run}"]
    assert main(first) == 0
    log = (run / "train.log").read_text()
    assert "memory: cpu" in log and "stage 1 epoch 1/1" in log
    capsys.readouterr()
    # the run's own configuration, one epoch more: a warning says what changes
    assert main(["train", "--resume", str(run), "--stage", "1", "--no-progress",
                 "train.stage1.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert "train.stage1.epochs was 1 in the run and is 2 now" in err
    log = (run / "train.log").read_text()
    assert "WARNING" in log and "train.stage1.epochs was 1" in log and "stage 1 epoch 2/2" in log
    assert main(["train", "--resume", str(run), "--preset", "demo"]) == 2
    assert "drop --config, --preset and --init" in capsys.readouterr().err


def test_resume_on_another_number_of_processes_says_what_changes():
    from glancefocus.train.state import resume_changes

    stored = {"train": {"batch_size": 64, "stage1": {"epochs": 3}}}
    changes = resume_changes(stored, stored, {"epoch": 2, "world_size": 2}, 1, 4)
    assert len(changes) == 1 and "from 32 to 16 images" in changes[0]
