"""Export a static network (the demo's baseline, or any classifier with random weights for
measuring) as a one-step model: the same manifest and runtime as a GFNet, with no exits, so
that it is served and measured the same way.

A static checkpoint (what `glancefocus demo` writes as static.pt) is a torch.save'd dict:
{"format": "glancefocus-static", "model_config": ModelConfig fields, "data_config": DataConfig
fields, "state_dict": the backbone's, "num_classes": int, "class_names": [...] or None}.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from glancefocus_runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
from glancefocus_runtime.onnx_deps import require_onnx

from ..config import DataConfig, ModelConfig, from_dict
from ..macs import count_static_macs
from .writer import CHECK_BATCH, OPSET, TRACE_BATCH, ExportError, _compare, _export, _write_text

STATIC_FORMAT = "glancefocus-static"
GRAPH = "static.onnx"


class StaticGraph(nn.Module):
    """images -> logits and the box looked at (the whole input), as a GFNet's glance answers."""

    def __init__(self, backbone: nn.Module, height: int, width: int):
        super().__init__()
        self.backbone, self.height, self.width = backbone, height, width

    def forward(self, images: torch.Tensor):
        box = torch.tensor([0, 0, self.width, self.height], dtype=torch.long)
        return self.backbone(images), box.unsqueeze(0).repeat(images.shape[0], 1)


def is_static_checkpoint(path: Union[str, Path]) -> Optional[dict]:
    """The static checkpoint at `path` (loaded without unpickling code), or None if the file is
    not one."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain torch file: let the checkpoint loader say why
        return None
    if isinstance(content, dict) and content.get("format") == STATIC_FORMAT:
        return content
    return None


def load_static(content: dict, source: str = "static checkpoint") -> tuple:
    """(backbone, ModelConfig, DataConfig, class names) from a static checkpoint's dict."""
    from ..train.static import build_static_backbone

    missing = [k for k in ("model_config", "data_config", "state_dict", "num_classes")
               if k not in content]
    if missing:
        raise ExportError(f"{source} lacks the fields {', '.join(missing)} of a "
                          f"'{STATIC_FORMAT}' checkpoint")
    model_config = from_dict(ModelConfig, dict(content["model_config"]), prefix="model_config.")
    data = dict(content["data_config"])
    data.pop("root", None)
    data_config = from_dict(DataConfig, data, prefix="data_config.")
    backbone = build_static_backbone(model_config, int(content["num_classes"]),
                                     data_config.image_size)
    backbone.load_state_dict(content["state_dict"])
    return backbone, model_config, data_config, content.get("class_names")


def export_static_onnx(backbone: nn.Module, data: DataConfig, in_chans: int,
                       out_dir: Union[str, Path], arch: str, class_names=None,
                       source: Optional[str] = None, image_size: Optional[int] = None) -> dict:
    """Write OUT_DIR/static.onnx and a one-step manifest.json; return the manifest."""
    onnx, ort = require_onnx()
    from ..transforms import create_transform

    data = create_transform(data, channels=in_chans).data
    size = int(image_size or data.image_size)
    backbone = copy.deepcopy(backbone).float().cpu().eval()
    num_classes = backbone.get_classifier().out_features
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    graph = StaticGraph(backbone, size, size).eval()
    images = torch.randn(CHECK_BATCH, in_chans, size, size,
                         generator=torch.Generator().manual_seed(0))
    if size != data.image_size:  # a ViT's position embeddings fix its input size
        try:
            with torch.no_grad():
                graph(images[:1])
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ExportError(f"the static {arch} network was trained on {data.image_size} x "
                              f"{data.image_size} images and cannot take {size} x {size} ones "
                              f"(export it at --image-size {data.image_size}): {exc}") from exc
    names = ["logits", "box"]
    signature = (["images"], names, {n: {0: "batch"} for n in ["images", *names]})
    exporter = _export(graph, GRAPH, out, (images[:TRACE_BATCH],), size, signature, arch)
    onnx.checker.check_model(str(out / GRAPH), full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out / GRAPH), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [t.numpy() for t in graph(images)]
    got = session.run(None, {"images": images.numpy()})
    for key, want, have in zip(names, expected, got):
        _compare(key, 1, want, have, GRAPH)
    macs = count_static_macs(backbone, size, size, in_chans)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
        "exporter": exporter, "opset": OPSET, "torch_version": torch.__version__,
        "arch": arch, "num_classes": num_classes,
        "class_names": list(class_names) if class_names else None,
        "patch_size": size, "max_steps": 1, "classifier": "static",
        "input": {"channels": in_chans, "height": size, "width": size},
        "preprocessing": {
            "mode": "RGB" if in_chans == 3 else "L",
            "resize_size": round(size * data.resize_size / data.image_size), "image_size": size,
            "interpolation": data.interpolation, "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std], "small_images": data.small_images,
        },
        "steps": [{"step": 1, "graph": GRAPH}], "state_batch_axis": {},
        "macs_per_step": [int(macs)], "exit_curve": None,
        "check": {"batch": CHECK_BATCH,
                  "max_abs_logit_difference": float(np.abs(expected[0] - got[0]).max())},
    }
    _write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest
