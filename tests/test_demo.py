"""The demo end to end at a reduced size (the full one: docs/get-started.md and docs/results.md)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from glancefocus.checkpoint import load_checkpoint
from glancefocus.cli import main
from glancefocus.config import DataConfig, from_dict
from glancefocus.data import build_datasets
from glancefocus.demo import check_claims
from glancefocus.train.runtime import start_runtime
from glancefocus.train.static import evaluate_static, load_static_baseline

SMALL = ["data.canvas_size=48", "data.image_size=48", "model.patch_size=16", "data.num_clutter=2",
         "data.train_canvases=96", "data.test_canvases=64", "train.batch_size=32",
         "model.classifier_hidden=32", "model.policy_hidden=32", "train.stage1.epochs=1",
         "train.stage2.updates=2", "train.stage3.epochs=1", "train.one_stage.epochs=1",
         "train.static_epochs=1", "train.static_batch_size=16"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--threads", "1", *SMALL]) == 0
    assert torch.get_num_threads() == 1
    printed = capsys.readouterr().out
    assert "claims:" in printed and "total time" in printed

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("gfnet", "random_policy"):
        curve = metrics[name]
        assert len(curve["anytime_accuracy"]) == len(curve["anytime_macs"]) == 3
        assert len(curve["hit_rate"]) == 2
        assert all(0 <= a <= 100 for a in curve["anytime_accuracy"])
    assert metrics["gfnet"]["anytime_macs"] == metrics["random_policy"]["anytime_macs"]
    static = metrics["static_baseline"]
    assert 0 <= static["accuracy"] <= 100 and static["macs"] > metrics["gfnet"]["anytime_macs"][0]
    assert metrics["config"]["data"]["canvas_size"] == 48 and metrics["seconds"] > 0
    # the default recipe; the class count comes from the data, not from the preset
    assert metrics["config"]["train"]["recipe"] == "one-stage"
    assert metrics["config"]["model"]["num_classes"] == 10 and metrics["threads"] == 1
    assert static["epochs"] == 1 and static["batch_size"] == 16
    assert static["network"] == "CNN" and metrics["preset"] == "demo"
    assert set(metrics["stage_seconds"]) == set(metrics["stage_cpu_seconds"]) >= {
        "gfnet_training", "static_training"}
    assert set(metrics["claims"]) == {"first_focus_hit_rate", "policy_beats_random",
                                      "static_accuracy_at_third_macs", "accuracy_never_falls"}

    for figure in ("accuracy_vs_macs.png", "patches.png"):
        with Image.open(tmp_path / figure) as image:
            assert image.size[0] > 300
    model = load_checkpoint(tmp_path / "model.pt")
    assert model.class_names == [str(d) for d in range(10)]
    assert model.metrics["static_baseline"]["macs"] == static["macs"]
    # the saved model carries calibrated exits: it answers at a MACs budget
    assert len(metrics["budgeted"]["macs"]) == 39 and len(model.exit_curve["thresholds"]) == 39
    images = torch.stack([load_item[0] for load_item in _test_items(metrics, 4)])
    answers = model.predict(images, budget=max(metrics["budgeted"]["macs"]))
    assert len(answers) == 4 and all(1 <= a.exit_step <= 3 for a in answers)

    # the static baseline, saved to be exported: the same CNN, giving the measured accuracy
    backbone, saved = load_static_baseline(tmp_path / "static.pt")
    assert saved["format"] == "glancefocus-static" and saved["num_classes"] == 10
    assert saved["class_names"] == model.class_names
    assert saved["model_config"] == metrics["config"]["model"]
    assert saved["data_config"] == metrics["config"]["data"]
    # (the demo ran it channels_last: other kernels, so a near-tie may flip one image)
    accuracy = evaluate_static(backbone, _test_set(metrics), start_runtime("cpu"), 32)
    assert abs(accuracy - static["accuracy"]) <= 100 / 64 + 1e-9


def _test_set(metrics):
    data = from_dict(DataConfig, metrics["config"]["data"])
    return build_datasets(data, 1)[1]


def _test_items(metrics, count):
    test_set = _test_set(metrics)
    return [test_set[i] for i in range(count)]


def _metrics(accuracy, hit, random_accuracy, random_hit, static_accuracy, static_macs=60e6):
    macs = [6.2e6, 12.5e6, 18.9e6]
    return {"gfnet": {"anytime_accuracy": accuracy, "anytime_macs": macs, "hit_rate": hit},
            "random_policy": {"anytime_accuracy": random_accuracy, "anytime_macs": macs,
                              "hit_rate": random_hit},
            "static_baseline": {"accuracy": static_accuracy, "macs": static_macs}}


def test_claims_hold_for_the_reference_numbers():
    # the demo's measured GFNet, random locations and static CNN
    claims = check_claims(_metrics([91.7, 96.1, 96.9], [0.98, 0.97], [91.7, 92.7, 93.3],
                                   [0.16, 0.16], 96.3, 61.9e6))
    assert all(claim["holds"] for claim in claims.values()), claims


def test_claims_fail_when_they_should():
    claims = check_claims(_metrics([91.7, 92.0, 91.0], [0.5, 0.5], [91.7, 91.0, 92.0],
                                   [0.3, 0.3], 97.0))
    assert not any(claim["holds"] for claim in claims.values()), claims


def test_demo_three_stage_recipe(tmp_path, capsys):
    assert main(["demo", "--recipe", "three-stage", "--out", str(tmp_path), "--no-progress",
                 "--threads", "1", *SMALL]) == 0
    assert "claims:" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["train"]["recipe"] == "three-stage"
    assert (tmp_path / "run" / "stage3" / "last.pt").is_file()
    assert not (tmp_path / "run" / "one-stage").exists()
    assert len(metrics["gfnet"]["hit_rate"]) == 2 and len(metrics["budgeted"]["macs"]) == 39


def test_demo_with_the_vit_preset(tmp_path, capsys, caplog):
    """`--preset demo_vit`: the same demo and claims with a ViT as the encoders and as the static
    baseline, whose static.pt loads back (a ViT is built for its input size)."""
    caplog.set_level("INFO", logger="glancefocus.demo")
    assert main(["demo", "--preset", "demo_vit", "--out", str(tmp_path), "--no-progress",
                 "--threads", "1", *SMALL, "model.encoder_kwargs={depth: 1}"]) == 0
    printed = capsys.readouterr().out
    assert "static ViT on the whole canvas" in printed and "claims:" in printed
    started = next(r.getMessage() for r in caplog.records if "output in" in r.getMessage())
    assert "preset demo_vit (demo_vit encoders)" in started and "time not measured" in started
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["preset"] == "demo_vit" and metrics["config"]["model"]["arch"] == "demo_vit"
    assert metrics["config"]["train"]["one_stage"]["optimizer"] == "adamw"
    assert metrics["static_baseline"]["network"] == "ViT" and len(metrics["claims"]) == 4
    assert load_checkpoint(tmp_path / "model.pt").config.arch == "demo_vit"
    backbone, _ = load_static_baseline(tmp_path / "static.pt")
    accuracy = evaluate_static(backbone, _test_set(metrics), start_runtime("cpu"), 32)
    assert abs(accuracy - metrics["static_baseline"]["accuracy"]) <= 100 / 64 + 1e-9
