"""A GFNet with ViT encoders (the demo_vit preset) through the command line, end to end:
`glancefocus train`, `evaluate`, `predict` (with --budget), `export` and `predict --exported`,
on a one-block ViT trained for a few steps on a few hundred canvases."""
import json

import numpy as np
import pytest
from engine_parity import CONFIDENCE_TOLERANCE
from PIL import Image

from glancefocus.checkpoint import load_checkpoint
from glancefocus.cli import main
from glancefocus.config import DataConfig
from glancefocus.data import build_datasets
from glancefocus.presets import get_preset

TINY_VIT = ["model.encoder_kwargs={depth: 1}", "data.train_canvases=256",
            "data.test_canvases=128", "train.batch_size=64", "model.classifier_hidden=32",
            "model.policy_hidden=32", "train.stage1.epochs=1", "train.stage2.updates=2",
            "train.stage3.epochs=1", "train.recipe=three-stage"]
IMAGES = 3


def write_canvases(folder, count):
    """`count` of the demo's test canvases as 8-bit grayscale PNG files."""
    data = DataConfig(**{**get_preset("demo_vit")["data"], "train_canvases": 1,
                         "test_canvases": count})
    test_set = build_datasets(data, 1)[1]
    paths = []
    for i in range(count):
        pixels = test_set[i][0][0].numpy() * data.std[0] + data.mean[0]
        paths.append(folder / f"canvas{i}.png")
        Image.fromarray(np.round(pixels.clip(0, 1) * 255).astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """(folder, calibrated checkpoint, image paths): trained with `glancefocus train --preset
    demo_vit`, its exits calibrated by `glancefocus evaluate`, once for the module."""
    folder = tmp_path_factory.mktemp("vit-cli")
    assert main(["train", "--preset", "demo_vit", "--no-progress",
                 f"train.out_dir={folder / 'run'}", *TINY_VIT]) == 0
    assert main(["evaluate", "--checkpoint", str(folder / "run" / "stage3" / "last.pt"),
                 "--out", str(folder / "eval"), "--calibrate-images", "128"]) == 0
    return folder, folder / "eval" / "model.pt", write_canvases(folder, IMAGES)


def predict_json(capsys, *args):
    capsys.readouterr()  # drop what earlier commands printed
    assert main(["predict", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_and_evaluate_a_vit_gfnet(vit_run):
    folder, checkpoint, _ = vit_run
    model = load_checkpoint(checkpoint)
    assert type(model.glance_encoder.backbone).__name__ == "VisionTransformer"
    assert model.config.arch == "demo_vit" and len(model.glance_encoder.backbone.blocks) == 1
    evaluation = json.loads((folder / "eval" / "evaluation.json").read_text())
    assert evaluation["macs_per_step"] == model.macs()["per_step"]
    assert len(evaluation["anytime"]["top1"]) == 3
    assert len(model.exit_curve["thresholds"]) == 39


def test_macs_of_the_vit_preset(capsys):
    capsys.readouterr()
    assert main(["macs", "--arch", "demo_vit", "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert counted["per_step"] == [11_347_584, 23_186_944, 35_026_304]


def test_predict_export_and_predict_exported(vit_run, capsys):
    folder, checkpoint, images = vit_run
    files = [str(path) for path in images]
    macs = load_checkpoint(checkpoint).macs()["per_step"]
    budget = str((macs[0] + macs[1]) / 2)
    torch_answers = predict_json(capsys, *files, "--checkpoint", str(checkpoint),
                                 "--budget", budget)
    assert [p["file"] for p in torch_answers["predictions"]] == files
    assert not torch_answers["errors"]
    for p in torch_answers["predictions"]:
        assert 1 <= p["exit_step"] <= 3 and p["macs"] == macs[p["exit_step"] - 1]
        assert len(p["boxes_in_original_pixels"]) == p["exit_step"]

    capsys.readouterr()
    assert main(["export", str(checkpoint), str(folder / "onnx")]) == 0
    manifest = json.loads((folder / "onnx" / "manifest.json").read_text())
    assert manifest["arch"] == "demo_vit" and manifest["macs_per_step"] == macs

    exported = predict_json(capsys, *files, "--exported", str(folder / "onnx"),
                            "--budget", budget)
    assert exported["thresholds"] == pytest.approx(torch_answers["thresholds"])
    assert [p["file"] for p in exported["predictions"]] == files
    # every step run: the engines' answers agree within float32 rounding (a label may differ
    # only where the two best classes nearly tie)
    both = [predict_json(capsys, *files, flag, str(path), "--top-k", "2")["predictions"]
            for flag, path in (("--checkpoint", checkpoint), ("--exported", folder / "onnx"))]
    for ours, theirs in zip(*both):
        assert ours["exit_step"] == theirs["exit_step"] == 3
        # a crop corner may move by a pixel where its location sits next to a pixel boundary
        assert np.abs(np.subtract(ours["boxes_in_model_input"],
                                  theirs["boxes_in_model_input"])).max() <= 1
        assert abs(ours["confidence"] - theirs["confidence"]) <= CONFIDENCE_TOLERANCE
        first, second = (entry["probability"] for entry in ours["top_k"])
        if first - second > 2 * CONFIDENCE_TOLERANCE:
            assert ours["label"] == theirs["label"]


def test_a_static_vit_exported_at_another_size_is_refused_clearly(tmp_path):
    from glancefocus.config import ModelConfig
    from glancefocus.export import ExportError, export_static_onnx
    from glancefocus.train.static import build_static_backbone

    data = DataConfig(**{**get_preset("demo_vit")["data"], "image_size": 32, "canvas_size": 32})
    model = ModelConfig(**{**get_preset("demo_vit")["model"], "encoder_kwargs": {"depth": 1}})
    backbone = build_static_backbone(model, 10, 32)
    with pytest.raises(ExportError, match="trained on 32 x 32 images and cannot take 48 x 48"):
        export_static_onnx(backbone, data, 1, tmp_path / "onnx", "demo_vit", image_size=48)
    assert not (tmp_path / "onnx" / "manifest.json").exists()
