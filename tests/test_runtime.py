"""The ONNX early-exit runtime: same answers as the PyTorch predictor, preprocessing equal to
create_transform, importable and usable with PyTorch blocked, clear errors for bad input."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import glancefocus as gf  # noqa: E402
from glancefocus import exits  # noqa: E402
from glancefocus.config import DataConfig  # noqa: E402
from glancefocus.data import load_image as torch_load_image  # noqa: E402
from glancefocus.data.folders import IMAGE_EXTENSIONS as FOLDER_EXTENSIONS  # noqa: E402
from glancefocus.export import export_onnx  # noqa: E402
from glancefocus.predictor import Predictor  # noqa: E402
from glancefocus_runtime import (  # noqa: E402
    IMAGE_EXTENSIONS,
    BudgetAboveCurveWarning,
    BudgetOutOfRangeError,
    ExportedPredictor,
    ManifestError,
    Preprocess,
    exit_rule,
    load_image,
)

BLOCK_TORCH = ("import sys; sys.modules.update(torch=None, torchvision=None, timm=None); ")


@pytest.fixture(scope="module")
def exported(exported_demo):
    return exported_demo


def test_exit_rule_is_shared():
    assert exits.budget_index is exit_rule.budget_index
    assert exits.BudgetOutOfRangeError is BudgetOutOfRangeError
    assert exits.BIG == exit_rule.BIG


def test_early_exit_matches_torch_at_five_budgets(exported):
    model, folder = exported
    # other images than the calibration's: no confidence sits exactly on a threshold
    images = torch.randn(200, 1, 100, 100, generator=torch.Generator().manual_seed(1))
    curve_macs = sorted(model.exit_curve["macs"])
    for budget in [curve_macs[i] for i in (0, 8, 18, 28, 38)] + [None]:
        want = Predictor(model, budget=budget, top_k=3).run(images)
        got = ExportedPredictor(folder, budget=budget, top_k=3).run(images.numpy())
        np.testing.assert_array_equal(got.labels, want.labels.numpy())
        np.testing.assert_array_equal(got.exit_steps, want.exit_steps.numpy())
        np.testing.assert_array_equal(got.boxes, want.boxes.numpy())
        # MACs from the manifest's table (counted at export on the plain modules)
        table = np.asarray(ExportedPredictor(folder).model.step_macs)
        np.testing.assert_array_equal(got.macs, table[got.exit_steps - 1])
        np.testing.assert_array_equal(got.top_labels, want.top_labels.numpy())
        np.testing.assert_allclose(got.confidences, want.confidences.numpy(), atol=1e-5)
    assert len(set(got.exit_steps.tolist())) == 1  # no budget: everyone runs every step


@pytest.mark.parametrize("mode,interpolation,resize,crop", [
    ("RGB", "bilinear", 40, 32), ("RGB", "bicubic", 37, 30), ("L", "bilinear", 50, 50)])
def test_preprocessing_equals_create_transform(mode, interpolation, resize, crop):
    channels = 3 if mode == "RGB" else 1
    data = DataConfig(image_size=crop, resize_size=resize, interpolation=interpolation,
                      mean=[0.4] * channels, std=[0.3] * channels)
    transform = gf.create_transform(data, channels=channels)
    ours = Preprocess({"mode": mode, "image_size": crop, "resize_size": resize,
                       "interpolation": interpolation, "mean": [0.4] * channels,
                       "std": [0.3] * channels, "small_images": "resize"})
    rng = np.random.default_rng(0)
    for height, width in ((61, 83), (90, 45), (50, 50)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        np.testing.assert_array_equal(ours(image), transform(image).numpy())
        boxes = [[0, 0, crop, crop], [3, 5, 19, 21]]
        assert ours.boxes_to_original(boxes, image.size) == transform.boxes_to_original(
            boxes, image.size)


def test_file_reading_equals_the_torch_path(tmp_path):
    assert IMAGE_EXTENSIONS == FOLDER_EXTENSIONS
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        for mode, channels in (("RGB", 3), ("L", 1)):
            ours = np.asarray(load_image(tmp_path / name, mode))
            assert np.array_equal(ours, np.asarray(torch_load_image(tmp_path / name, channels)))


def test_clear_errors(exported, tmp_path):
    model, folder = exported
    predictor = ExportedPredictor(folder)
    with pytest.raises(ValueError, match=r"images must be \[N, 1, 100, 100\]"):
        predictor.run(np.zeros((2, 1, 64, 64), dtype=np.float32))
    with pytest.raises(BudgetOutOfRangeError, match="calibrated curve spans"):
        ExportedPredictor(folder, budget=1.0)
    with pytest.warns(BudgetAboveCurveWarning):
        ExportedPredictor(folder, budget=1e15)
    with pytest.raises(ValueError, match="not both"):
        ExportedPredictor(folder, budget=1e7, thresholds=[0.5, 0.5, 0.5])
    with pytest.raises(ManifestError, match="holds no manifest.json"):
        ExportedPredictor(tmp_path)
    # a model exported without calibrated exits, asked for a budget
    model.exit_curve, saved = None, model.exit_curve
    try:
        export_onnx(model, tmp_path / "plain")
    finally:
        model.exit_curve = saved
    with pytest.raises(ValueError, match="no calibrated exit curve.*glancefocus evaluate"):
        ExportedPredictor(tmp_path / "plain", budget=1e7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExportedPredictor(tmp_path / "plain")  # no budget: fine


def run_cli(args, block_torch=False):
    prefix = BLOCK_TORCH if block_torch else "import sys; "
    code = prefix + "from glancefocus.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_predict_exported_without_torch_matches_checkpoint(exported, tmp_path):
    model, folder = exported
    gf.save_checkpoint(model, tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (90 + 9 * i, 120), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    budget = sorted(model.exit_curve["macs"])[20]
    common = [tmp_path, "--budget", budget, "--json", "--top-k", 2]
    torch_run = run_cli(["predict", *common, "--checkpoint", tmp_path / "model.pt"])
    onnx_run = run_cli(["predict", *common, "--exported", folder], block_torch=True)
    assert torch_run.returncode == onnx_run.returncode == 1, onnx_run.stderr  # the bad file
    assert "bad.png" in onnx_run.stderr
    want, got = json.loads(torch_run.stdout), json.loads(onnx_run.stdout)
    assert got["thresholds"] == want["thresholds"] and got["engine"] == "onnxruntime"
    assert [e["file"] for e in got["errors"]] == [e["file"] for e in want["errors"]]
    assert len(got["predictions"]) == 5
    for a, b in zip(want["predictions"], got["predictions"]):
        for key in ("file", "label", "class_name", "exit_step", "original_size",
                    "boxes_in_original_pixels", "boxes_in_model_input"):
            assert a[key] == b[key], key
        assert [c["label"] for c in a["top_k"]] == [c["label"] for c in b["top_k"]]
        assert b["confidence"] == pytest.approx(a["confidence"], abs=1e-5)
    # the table too, and torch-only commands say what they need
    assert run_cli(["predict", tmp_path / "0.png", "--exported", folder], True).returncode == 0
    train = run_cli(["train", "--help"], block_torch=True)
    assert train.returncode == 2 and "needs the 'torch' package" in train.stderr
    checkpoint = run_cli(["predict", tmp_path / "0.png", "--checkpoint", "x.pt"], True)
    assert checkpoint.returncode == 2 and "--exported DIR" in checkpoint.stderr


def test_runtime_imports_without_torch():
    code = BLOCK_TORCH + ("import glancefocus.runtime as rt, glancefocus; "
                          "assert 'torch' not in [m for m in sys.modules if sys.modules[m]]; "
                          "print(rt.ExportedPredictor.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ExportedPredictor"


def test_missing_onnxruntime_is_one_clear_error(exported):
    _, folder = exported
    code = ("import sys; sys.modules['onnxruntime'] = None; "
            "from glancefocus.cli import main; sys.exit(main())")
    run = subprocess.run([sys.executable, "-c", code, "predict", "x.png", "--exported",
                          str(folder)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "pip install 'glancefocus[onnx]'" in run.stderr
