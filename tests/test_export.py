"""ONNX export: the step graphs equal `model.step`, run on onnxruntime within 1e-4, and what
cannot be exported is refused with a clear error."""
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from engine_parity import (  # noqa: E402
    LOCATION_TOLERANCE,
    LOGIT_TOLERANCE,
    assert_same_answers,
    crop_near_ties,
)

import glancefocus as gf  # noqa: E402
from glancefocus import crops  # noqa: E402
from glancefocus.cli import main  # noqa: E402
from glancefocus.export import ExportError, export_onnx  # noqa: E402
from glancefocus.export.steps import FocusGraph, GlanceGraph, resize_matrix  # noqa: E402
from glancefocus.runtime import ExportedModel, MissingDependencyError  # noqa: E402

STATE = ("feature_map", "classifier_state", "policy_hidden")


def demo_model(**overrides):
    torch.manual_seed(0)
    return gf.create_model("demo", num_classes=10, **overrides).eval()


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    model = demo_model()
    folder = tmp_path_factory.mktemp("demo-onnx")
    return model, folder, export_onnx(model, folder)


def run_both(model, exported, images):
    """Per-step (PyTorch outputs, onnxruntime outputs), every image running every step."""
    pairs, out, state = [], None, None
    with torch.inference_mode():
        for k in range(1, model.config.max_steps + 1):
            out = model.step(images) if k == 1 else model.step(images, out.state)
            got = exported.step(k, images.numpy(), state)
            state = {name: got[f"next_{name}"] for name in STATE}
            pairs.append((out, got))
    return pairs


def assert_step_parity(model, exported, images):
    """Logits and locations within the engines' tolerances; the boxes equal except where a
    location sits within that tolerance of a pixel boundary (engine_parity)."""
    height, width = images.shape[-2:]
    span = (height - model.config.patch_size, width - model.config.patch_size)
    for k, (out, got) in enumerate(run_both(model, exported, images), start=1):
        np.testing.assert_allclose(got["logits"], out.logits.numpy(), atol=LOGIT_TOLERANCE,
                                   rtol=0, err_msg=f"step {k} logits")
        near = np.zeros(images.shape[0], dtype=bool)
        if k > 1:
            np.testing.assert_allclose(got["location"], out.location.numpy(),
                                       atol=LOCATION_TOLERANCE, rtol=0)
            near = crop_near_ties(out.location.numpy(), span)
        assert_same_answers({"box": out.box.numpy()}, {"box": got["box"]}, near, f"step {k}")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_is_the_glance(mode, antialias):
    images = torch.randn(2, 3, 50, 70)
    rows, cols = resize_matrix(50, 16, mode, antialias), resize_matrix(70, 16, mode, antialias)
    np.testing.assert_allclose((rows @ images @ cols.t()).numpy(),
                               crops.glance(images, 16, mode, antialias).numpy(), atol=1e-4)


def test_step_modules_equal_model_step():
    model = demo_model()
    images = torch.randn(3, 1, 100, 100)
    glance, focus = GlanceGraph(model, 100, 100).eval(), FocusGraph(model, 100, 100, 2).eval()
    with torch.inference_mode():
        out = model.step(images)
        logits, fmap, classifier_state, policy_hidden, box = glance(images)
        torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
        assert torch.equal(box, out.box)  # the glance's box: the whole image, no arithmetic
        nxt = model.step(images, out.state)
        logits, _, _, _, location, box = focus(images, fmap, classifier_state, policy_hidden)
        torch.testing.assert_close(logits, nxt.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(location, nxt.location, atol=LOCATION_TOLERANCE, rtol=0)
        # the graph's glance is a resize by matrices, the model's F.interpolate: other kernels
        side = 100 - model.config.patch_size
        near = crop_near_ties(nxt.location.numpy(), (side, side))
        assert_same_answers({"box": nxt.box.numpy()}, {"box": box.numpy()}, near)


def test_demo_export_manifest_and_parity(demo_export):
    model, folder, manifest = demo_export
    assert (folder / "glance.onnx").is_file() and (folder / "focus.onnx").is_file()
    stored = json.loads((folder / "manifest.json").read_text())
    assert stored == manifest
    assert manifest["exporter"] in ("dynamo", "torchscript")
    assert [s["graph"] for s in manifest["steps"]] == ["glance.onnx", "focus.onnx", "focus.onnx"]
    # at least the demo CNN's 6,145,648 MACs (convolutions + BatchNorm channels) per step
    assert manifest["macs_per_step"][0] >= 6_145_648
    assert manifest["preprocessing"] == {"mode": "L", "resize_size": 100, "image_size": 100,
                                         "interpolation": "bilinear", "mean": [0.5],
                                         "std": [0.5], "small_images": "resize"}
    assert manifest["input"] == {"channels": 1, "height": 100, "width": 100}
    # batch sizes other than the traced one: the batch axis is dynamic
    exported = ExportedModel(folder)
    for batch in (1, 7):
        assert_step_parity(model, exported, torch.randn(batch, 1, 100, 100))


def test_cascaded_classifier_exports_a_graph_per_focus_step(tmp_path):
    model = demo_model(classifier="cascaded", glance_head="encoder")
    manifest = export_onnx(model, tmp_path)
    assert [s["graph"] for s in manifest["steps"]] == ["glance.onnx", "focus_2.onnx",
                                                       "focus_3.onnx"]
    assert manifest["state_batch_axis"]["classifier_state"] == 0
    assert_step_parity(model, ExportedModel(tmp_path), torch.randn(4, 1, 100, 100))


def test_tiny_timm_cnn_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    model = gf.create_model("test_resnet", num_classes=7, patch_size=32, max_steps=3,
                            policy_hidden=32, classifier_hidden=32).eval()
    manifest = export_onnx(model, tmp_path, image_size=64)
    assert manifest["input"] == {"channels": 3, "height": 64, "width": 64}
    # 64 of the preset default's 224/256: the resize keeps its ratio to the crop
    assert manifest["preprocessing"]["resize_size"] == round(64 * 256 / 224)
    assert_step_parity(model, ExportedModel(tmp_path), torch.randn(3, 3, 64, 64))


class _Eigenvalues:
    """forward_features plus an op the ONNX exporters do not support (eigenvalues)."""

    def __init__(self, forward_features):
        self.forward_features = forward_features

    def __call__(self, x):
        fmap = self.forward_features(x)
        return fmap + torch.linalg.eigvals(fmap[..., :4, :4]).real.mean()


def test_unsupported_encoder_op_is_refused(tmp_path):
    model = demo_model()
    backbone = model.focus_encoder.backbone
    backbone.forward_features = _Eigenvalues(backbone.forward_features)
    with pytest.raises(ExportError, match="cannot export the focus step of model.arch 'demo_cnn'"):
        export_onnx(model, tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_export_command_and_errors(tmp_path, capsys, monkeypatch):
    model = demo_model()
    gf.save_checkpoint(model, tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), str(tmp_path / "out")]) == 0
    assert "manifest.json" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").is_file()
    # an input smaller than the patch: one line, exit status 2
    assert main(["export", str(tmp_path / "model.pt"), str(tmp_path / "o2"),
                 "--image-size", "16"]) == 2
    assert "smaller than the model's patch size 32" in capsys.readouterr().err
    # onnx not installed: the install hint, one line
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'glancefocus\[onnx\]'"):
        export_onnx(model, tmp_path / "o3")
