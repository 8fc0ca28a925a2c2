"""`glancefocus evaluate` end to end on tiny models and tiny data."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint import make_authors_file

from glancefocus import create_model, exits, load_checkpoint, save_checkpoint
from glancefocus.checkpoint import read_checkpoint
from glancefocus.cli import main
from glancefocus.config import DataConfig, from_dict, to_dict
from glancefocus.data.cluttered_mnist import ClutteredMNIST
from glancefocus.predictor import Predictor

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
    """A tiny demo checkpoint, evaluated once with calibration on training canvases. Returns
    (the checkpoint given, its bytes before, OUT, evaluation.json, what was printed)."""
    folder = tmp_path_factory.mktemp("evaluate")
    ckpt = folder / "model.pt"
    tiny_demo_checkpoint(ckpt)
    before = ckpt.read_bytes()
    out = folder / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "50",
                     "--budget", "1e7", "--device", "cpu",
                     "--static-baseline-macs", "6.2e7", "--static-baseline-accuracy", "20"]) == 0
    return ckpt, before, out, json.loads((out / "evaluation.json").read_text()), printed.getvalue()


def test_json_holds_anytime_and_budgeted_results(evaluated):
    ckpt, _, out, results, _ = evaluated
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
    """Anytime accuracy and every budget's accuracy and MACs, recomputed from all-steps logits
    in the command's batches of 50 on the CPU: the same kernels, so the same figures exactly
    (other batch sizes or devices may flip a decision next to a boundary; see engine_parity)."""
    ckpt, _, _, results, _ = evaluated
    model = load_checkpoint(ckpt)
    val = ClutteredMNIST(from_dict(DataConfig, dict(to_dict(DataConfig()), **TINY_MNIST)), "test")
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = val.labels
    with torch.no_grad():
        logits = torch.cat([model(chunk).logits for chunk in images.split(50)], dim=1)
    expected = exits.anytime_accuracy(logits, labels)
    assert results["anytime"]["top1"] == pytest.approx(expected["top1"])
    assert results["anytime"]["top5"] == pytest.approx(expected["top5"])
    conf, pred = exits.confidences_from_logits(logits)
    for i in (0, 15, 38):
        sim = exits.simulate_exits(conf, pred, labels, results["budgeted"]["thresholds"][i],
                                   results["macs_per_step"])
        assert results["budgeted"]["accuracy"][i] == pytest.approx(sim["accuracy"])
        assert results["budgeted"]["macs"][i] == pytest.approx(sim["macs"])


def test_the_checkpoint_given_is_left_alone_and_the_copy_holds_the_curve(evaluated, capsys):
    ckpt, before, out, results, printed = evaluated
    assert ckpt.read_bytes() == before
    assert results["stored_in"] == str(out / "model.pt")
    assert f"stored in {out / 'model.pt'}" in printed
    copy = load_checkpoint(out / "model.pt")
    for key in ("budgets", "thresholds", "macs", "accuracy"):
        assert copy.exit_curve[key] == results["budgeted"][key]
    assert copy.metrics["anytime_top1"] == results["anytime"]["top1"]
    raw = read_checkpoint(out / "model.pt")
    assert raw["config"]["data"]["canvas_size"] == 48 and raw["training"] is None
    original = load_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(),
                                                  original.state_dict().values()))
    # the copy serves a budget
    budget = results["budgeted"]["macs"][5]
    predictor = Predictor(copy, budget=budget)
    assert predictor.thresholds.tolist() == exits.thresholds_for_budget(copy.exit_curve, budget).tolist()

    # OUT/model.pt must not be the checkpoint itself, unless --in-place says so
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--out", str(out)]) == 2
    assert "--in-place" in capsys.readouterr().err


def test_budget_prints_the_accuracy_predict_would_get(evaluated, tmp_path, capsys):
    _, _, out, results, printed = evaluated
    budgeted = results["budgeted"]
    index = exits.budget_index(budgeted, 1e7)
    assert results["at_budget"] == {"budget_macs": 1e7, "q": budgeted["budgets"][index],
                                    "macs": budgeted["macs"][index],
                                    "accuracy": budgeted["accuracy"][index],
                                    "thresholds": budgeted["thresholds"][index]}
    assert (f"at a budget of 10,000,000 MACs per image: top-1 {budgeted['accuracy'][index]:.2f} % "
            f"at {budgeted['macs'][index]:,.0f} MACs per image") in printed
    # the summary table gives the MACs per image beside q
    assert "budget q  MACs / image" in printed
    assert f"{budgeted['budgets'][0]:>8.2f}  {budgeted['macs'][0]:>16,.0f}" in printed
    # predict --budget picks the same thresholds
    model = load_checkpoint(out / "model.pt")
    assert Predictor(model, budget=1e7).thresholds.tolist() == budgeted["thresholds"][index]

    # below the curve: an error naming its range, after the results are written
    low = tmp_path / "low"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--calibrate", "stored",
                 "--budget", "1000", "--out", str(low)]) == 2
    err = capsys.readouterr().err
    assert f"spans {min(budgeted['macs']):.6g} to {max(budgeted['macs']):.6g} MACs per image" in err
    assert (low / "evaluation.json").exists() and (low / "model.pt").exists()
    # above the curve: a one-line warning naming the range, the curve's end used
    high = tmp_path / "high"
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--calibrate", "stored",
                 "--budget", "1e12", "--out", str(high)]) == 0
    captured = capsys.readouterr()
    assert "warning: the budget of 1e+12 MACs per image is above the calibrated curve" in captured.err
    top = json.loads((high / "evaluation.json").read_text())["at_budget"]
    assert top["macs"] == max(budgeted["macs"])


def test_in_place_rewrites_the_checkpoint_and_keeps_everything_else(evaluated, tmp_path):
    ckpt = tmp_path / "model.pt"
    shutil.copy(evaluated[0], ckpt)
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--in-place",
                 "--calibrate-images", "50"]) == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert results["stored_in"] == str(ckpt) and not (out / "model.pt").exists()
    raw = read_checkpoint(ckpt)
    assert raw["training"]["stage"] == 3 and torch.equal(raw["training"]["optimizer"]["lr"], torch.tensor(0.1))
    assert raw["config"]["train"] == {"calibrate_images": 200, "seed": 3}
    assert raw["config"]["data"]["canvas_size"] == 48
    model = load_checkpoint(ckpt)
    for key in ("budgets", "thresholds", "macs", "accuracy"):
        assert model.exit_curve[key] == results["budgeted"][key]
    assert model.metrics["anytime_top1"] == results["anytime"]["top1"]


def test_calibrate_stored_reuses_the_curve_and_train_is_deterministic(evaluated, tmp_path):
    ckpt, _, out, first, _ = evaluated
    stored_out = tmp_path / "stored"
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--calibrate", "stored",
                 "--out", str(stored_out)]) == 0
    stored = json.loads((stored_out / "evaluation.json").read_text())
    assert stored["calibration"]["mode"] == "stored"
    for key in ("thresholds", "macs", "accuracy"):
        assert stored["budgeted"][key] == first["budgeted"][key]
    # the same seed picks the same calibration images and augmentation
    out2 = tmp_path / "again"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out2), "--calibrate-images", "200"]) == 0
    assert json.loads((out2 / "evaluation.json").read_text())["budgeted"] == first["budgeted"]


def test_calibrate_images_option_and_argument_errors(evaluated, tmp_path, capsys):
    ckpt = evaluated[0]
    out = tmp_path / "fifty"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--calibrate-images", "50"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["calibration"]["images"] == 50
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out),
                 "--static-baseline-macs", "1e9"]) == 2
    assert "--static-baseline-accuracy" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--budget", "-5"]) == 2
    assert "--budget must be > 0" in capsys.readouterr().err


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
    stored = load_checkpoint(out / "model.pt")
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
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(src), "--trust-pickle", "--calibrate", "stored",
                 "--data", str(root), "--out", str(out2), "--in-place"]) == 2
    assert "never rewritten" in capsys.readouterr().err and src.read_bytes() == before


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
    assert load_checkpoint(out / "model.pt").class_names == ["cat", "dog", "fox"]


def test_evaluate_and_predict_preprocess_with_the_same_function(tmp_path):
    """The validation images are transformed by create_transform, as predict's files are."""
    from glancefocus import create_transform
    from glancefocus.evaluate import data_config_for, validation_dataset

    root = make_image_folder(tmp_path / "images")
    torch.manual_seed(0)
    save_checkpoint(create_model("demo", in_chans=3, num_classes=3), tmp_path / "m.pt",
                    run_config={"data": {"dataset": "folder", "root": str(root), "image_size": 48,
                                         "resize_size": 56}})
    model = load_checkpoint(tmp_path / "m.pt")
    val = validation_dataset(data_config_for(model.run_config), 3)
    path, _ = val.samples[4]
    assert torch.equal(val[4][0], create_transform(model)(path))
