"""`glancefocus evaluate` end to end on tiny models and tiny data (REFERENCE §3)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from glancefocus import create_model, exits, load_checkpoint, save_checkpoint
from glancefocus.checkpoint import read_checkpoint
from glancefocus.cli import main
from glancefocus.config import DataConfig, from_dict, to_dict
from glancefocus.data.cluttered_mnist import ClutteredMNIST
from glancefocus.predictor import Predictor
from test_checkpoint import make_authors_file

TINY_MNIST = dict(dataset="cluttered-mnist", image_size=48, canvas_size=48, num_clutter=2,
                  mean=[0.5], std=[0.5], train_canvases=300, test_canvases=120)


def tiny_demo_checkpoint(path):
    torch.manual_seed(0)
    model = create_model("demo")
    with torch.no_grad():  # spread the confidences of the random model (see test_predictor.py)
        model.classifier.fc.weight.normal_(0, 3)
        model.classifier.rnn.weight_ih_l0.mul_(30)
    model.class_names = [str(d) for d in range(10)]
    run_config = {"data": dict(to_dict(DataConfig()), **TINY_MNIST),
                  "train": {"calibrate_images": 200, "seed": 3}}
    save_checkpoint(model, path, run_config=run_config,
                    training={"stage": 3, "epoch": 2, "optimizer": {"lr": torch.tensor(0.1)}})
    return model


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny demo checkpoint, evaluated once with calibration on training canvases."""
    folder = tmp_path_factory.mktemp("evaluate")
    ckpt = folder / "model.pt"
    tiny_demo_checkpoint(ckpt)
    out = folder / "out"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "50",
                 "--static-baseline-macs", "6.2e7", "--static-baseline-accuracy", "20"]) == 0
    return ckpt, out, json.loads((out / "evaluation.json").read_text())


def test_json_holds_anytime_and_budgeted_results(evaluated):
    ckpt, out, results = evaluated
    model = load_checkpoint(ckpt)
    steps = model.max_steps
    assert results["macs_per_step"] == model.macs()["per_step"]
    assert len(results["anytime"]["top1"]) == len(results["anytime"]["top5"]) == steps
    budgeted = results["budgeted"]
    assert budgeted["budgets"] == exits.budget_ratios()
    assert len(budgeted["thresholds"]) == len(budgeted["macs"]) == len(budgeted["accuracy"]) == 39
    assert all(len(row) == steps and row[-1] == -exits.BIG for row in budgeted["thresholds"])
    assert results["calibration"] == {"mode": "train", "images": 200, "seed": 0, "augmentation": True}
    assert results["data"]["val_images"] == 120
    assert results["static_baseline"] == {"macs": 6.2e7, "accuracy": 20.0}
    # small q: most images leave at the glance; large q: most run every step
    assert budgeted["macs"][0] < budgeted["macs"][-1]
    assert (out / "accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_match_a_direct_computation(evaluated):
    """Anytime accuracy and every budget's accuracy and MACs, recomputed from all-steps logits."""
    ckpt, _, results = evaluated
    model = load_checkpoint(ckpt)
    val = ClutteredMNIST(from_dict(DataConfig, dict(to_dict(DataConfig()), **TINY_MNIST)), "test")
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = val.labels
    with torch.no_grad():
        logits = model(images).logits
    expected = exits.anytime_accuracy(logits, labels)
    assert results["anytime"]["top1"] == pytest.approx(expected["top1"])
    assert results["anytime"]["top5"] == pytest.approx(expected["top5"])
    conf, pred = exits.confidences_from_logits(logits)
    for i in (0, 15, 38):
        sim = exits.simulate_exits(conf, pred, labels, results["budgeted"]["thresholds"][i],
                                   results["macs_per_step"])
        assert results["budgeted"]["accuracy"][i] == pytest.approx(sim["accuracy"])
        assert results["budgeted"]["macs"][i] == pytest.approx(sim["macs"])


def test_curve_is_stored_and_everything_else_kept(evaluated):
    ckpt, _, results = evaluated
    raw = read_checkpoint(ckpt)
    assert raw["training"]["stage"] == 3 and torch.equal(raw["training"]["optimizer"]["lr"], torch.tensor(0.1))
    assert raw["config"]["train"] == {"calibrate_images": 200, "seed": 3}
    assert raw["config"]["data"]["canvas_size"] == 48
    model = load_checkpoint(ckpt)
    for key in ("budgets", "thresholds", "macs", "accuracy"):
        assert model.exit_curve[key] == results["budgeted"][key]
    assert model.metrics["anytime_top1"] == results["anytime"]["top1"]
    # the stored curve survives another save/load and serves a budget
    again = ckpt.parent / "again.pt"
    save_checkpoint(model, again, run_config=raw["config"])
    reloaded = load_checkpoint(again)
    assert reloaded.exit_curve["thresholds"] == results["budgeted"]["thresholds"]
    budget = results["budgeted"]["macs"][5]
    predictor = Predictor(reloaded, budget=budget)
    assert predictor.thresholds.tolist() == exits.thresholds_for_budget(reloaded.exit_curve, budget).tolist()


def test_calibrate_stored_reuses_the_curve_and_train_is_deterministic(evaluated, tmp_path):
    ckpt, _, first = evaluated
    out = tmp_path / "stored"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--calibrate", "stored", "--out", str(out)]) == 0
    stored = json.loads((out / "evaluation.json").read_text())
    assert stored["calibration"]["mode"] == "stored"
    for key in ("thresholds", "macs", "accuracy"):
        assert stored["budgeted"][key] == first["budgeted"][key]
    # the same seed picks the same calibration images and augmentation
    out2 = tmp_path / "again"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out2), "--calibrate-images", "200"]) == 0
    assert json.loads((out2 / "evaluation.json").read_text())["budgeted"] == first["budgeted"]


def test_calibrate_images_option_and_argument_errors(evaluated, tmp_path, capsys):
    ckpt, _, _ = evaluated
    out = tmp_path / "fifty"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--calibrate-images", "50"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["calibration"]["images"] == 50
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out),
                 "--static-baseline-macs", "1e9"]) == 2
    assert "--static-baseline-accuracy" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# an authors' file: stored thresholds, image folder data

def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(70 + 7 * i, 90, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.filterwarnings("ignore:unpickling")
def test_authors_thresholds_survive_import_and_evaluate_stored(tmp_path, capsys):
    src, native = tmp_path / "authors.pth.tar", tmp_path / "native.pt"
    raw, _ = make_authors_file(src, "mobilenetv3_large_100", num_classes=3, patch_size=64)
    assert main(["convert", "--trust-pickle", str(src), str(native)]) == 0
    model = load_checkpoint(native)
    assert torch.allclose(torch.tensor(model.exit_curve["thresholds"]), raw["dynamic_threshold"])

    out = tmp_path / "out"
    capsys.readouterr()
    # no data section in the file: --data is required
    assert main(["evaluate", "--checkpoint", str(native), "--calibrate", "stored", "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err

    root = make_image_folder(tmp_path / "images")
    assert main(["evaluate", "--checkpoint", str(native), "--calibrate", "stored", "--data", str(root),
                 "--out", str(out)]) == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert results["data"]["val_images"] == 9
    assert results["budgeted"]["thresholds"] == model.exit_curve["thresholds"]
    stored = load_checkpoint(native)
    assert stored.exit_curve["thresholds"] == model.exit_curve["thresholds"]
    assert stored.exit_curve["macs"] == results["budgeted"]["macs"]   # measured on this val set
    assert stored.class_names == ["cat", "dog", "fox"]
    assert stored.metrics["source"] == "authors' release"             # kept

    # the authors' pickle itself is never rewritten: the curve goes to DIR/model.pt
    before = src.read_bytes()
    out2 = tmp_path / "out2"
    assert main(["evaluate", "--checkpoint", str(src), "--trust-pickle", "--calibrate", "stored",
                 "--data", str(root), "--out", str(out2)]) == 0
    assert src.read_bytes() == before
    assert load_checkpoint(out2 / "model.pt").exit_curve["thresholds"] == model.exit_curve["thresholds"]


def test_calibration_on_an_image_folder_with_augmentation(tmp_path):
    root = make_image_folder(tmp_path / "images")
    torch.manual_seed(0)
    model = create_model("demo", in_chans=3, num_classes=3)
    data = dict(dataset="folder", root=str(root), image_size=48, resize_size=56)
    save_checkpoint(model, tmp_path / "m.pt", run_config={"data": data})
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(out)]) == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert results["calibration"]["images"] == 9
    assert load_checkpoint(tmp_path / "m.pt").class_names == ["cat", "dog", "fox"]
