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

from engine_parity import (  # noqa: E402
    LOCATION_TOLERANCE,
    LOGIT_TOLERANCE,
    allowed_near_ties,
    assert_same_answers,
    near_ties,
    onnx_steps,
    torch_steps,
    varied_images,
)

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
    ExportedModel,
    ExportedPredictor,
    ManifestError,
    Preprocess,
    exit_rule,
    load_image,
)

BLOCK_TORCH = ("import sys; sys.modules.update(torch=None, torchvision=None, timm=None); ")


def test_top_classes_best_first_equal_ones_lower_class_first():
    from glancefocus_runtime.predictor import top_classes

    p = np.array([0.1, 0.3, 0.3, 0.2, 0.1], dtype=np.float32)
    for k in (1, 2, 5):  # k = 1 takes a shortcut: the same answer
        probabilities, labels = top_classes(p, k)
        assert labels.tolist() == [1, 2, 3, 0, 4][:k] and labels.dtype == np.int64
        assert probabilities.dtype == np.float32 and probabilities.tolist() == p[labels].tolist()
    probabilities, labels = top_classes(np.stack([p, p[::-1]]), 1)
    assert labels.tolist() == [[1], [2]] and probabilities.shape == (2, 1)


@pytest.fixture(scope="module")
def exported(exported_demo):
    return exported_demo


def test_exit_rule_is_shared():
    assert exits.budget_index is exit_rule.budget_index
    assert exits.BudgetOutOfRangeError is BudgetOutOfRangeError
    assert exits.BIG == exit_rule.BIG


def test_early_exit_matches_torch_at_five_budgets(exported):
    """Labels, exit steps, boxes and top-3 classes equal PyTorch's on every image that is clear
    of a near-tie (engine_parity), and near-ties are rare; confidences and logits agree within
    the tolerances."""
    model, folder = exported
    images = varied_images(200, seed=1, side=100)  # other images than the calibration's
    logits, locations = torch_steps(model, images)
    onnx_logits, onnx_locations = onnx_steps(ExportedModel(folder), images.numpy())
    np.testing.assert_allclose(onnx_logits, logits, atol=LOGIT_TOLERANCE, rtol=0)
    np.testing.assert_allclose(onnx_locations, locations, atol=LOCATION_TOLERANCE, rtol=0)
    side = 100 - model.config.patch_size
    table = np.asarray(ExportedPredictor(folder).model.step_macs)
    curve_macs = sorted(model.exit_curve["macs"])
    for budget in [curve_macs[i] for i in (0, 8, 18, 28, 38)] + [None]:
        torch_predictor = Predictor(model, budget=budget, top_k=3)
        onnx_predictor = ExportedPredictor(folder, budget=budget, top_k=3)
        np.testing.assert_array_equal(onnx_predictor.thresholds, torch_predictor.thresholds.numpy())
        want = torch_predictor.run(images)
        got = onnx_predictor.run(images.numpy())
        near = near_ties(logits, locations, onnx_predictor.thresholds, (side, side), top_k=3)
        fields = ("labels", "exit_steps", "boxes", "top_labels")
        assert_same_answers({f: getattr(want, f).numpy() for f in fields},
                            {f: getattr(got, f) for f in fields}, near, f"budget {budget}")
        clear = ~near
        np.testing.assert_allclose(got.confidences[clear], want.confidences.numpy()[clear],
                                   atol=1e-5)
        # MACs from the manifest's table (counted at export on the plain modules)
        np.testing.assert_array_equal(got.macs, table[got.exit_steps - 1])
        if budget in curve_macs[1:3]:
            assert set(got.exit_steps.tolist()) == {1, 2, 3}  # the comparison covers every step
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
    torch_run = run_cli(["predict", *common, "--checkpoint", tmp_path / "model.pt", "--device",
                         "cpu"])
    onnx_run = run_cli(["predict", *common, "--exported", folder], block_torch=True)
    assert torch_run.returncode == onnx_run.returncode == 1, onnx_run.stderr  # the bad file
    assert "bad.png" in onnx_run.stderr
    want, got = json.loads(torch_run.stdout), json.loads(onnx_run.stdout)
    assert got["thresholds"] == want["thresholds"] and got["engine"] == "onnxruntime"
    assert [e["file"] for e in got["errors"]] == [e["file"] for e in want["errors"]]
    assert len(got["predictions"]) == 5
    assert [a["file"] for a in want["predictions"]] == [b["file"] for b in got["predictions"]]
    # the answers are equal where no decision sits within the engines' tolerance of a boundary
    transform = gf.create_transform(model)
    canvases = torch.stack([transform(a["file"]) for a in want["predictions"]])
    logits, locations = torch_steps(model, canvases)
    side = 100 - model.config.patch_size
    near = near_ties(logits, locations, want["thresholds"], (side, side), top_k=2)
    keys = ("label", "class_name", "exit_step", "original_size", "boxes_in_original_pixels",
            "boxes_in_model_input")
    for a, b, tie in zip(want["predictions"], got["predictions"], near):
        assert tie or all(a[key] == b[key] for key in keys), (a, b)
        assert tie or [c["label"] for c in a["top_k"]] == [c["label"] for c in b["top_k"]]
        assert tie or b["confidence"] == pytest.approx(a["confidence"], abs=1e-5)
    assert near.sum() <= allowed_near_ties(5), f"{near.sum()} of 5 images sit next to a boundary"
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
