"""Exported models and image files for benchmarks/serve_load.py (needs PyTorch; the load test
itself does not).

    python benchmarks/serve_models.py resnet50 OUT [--images 128]
        OUT/gfnet: the resnet50 preset at 224 px, random weights, its exits calibrated on its
        own outputs for random images (as benchmarks/early_exit.py does); OUT/static: a resnet50
        with random weights on the whole 224 px image; OUT/images: JPEG files (256 px).
    python benchmarks/serve_models.py demo OUT --checkpoint DIR/model.pt --static DIR/static.pt
        OUT/gfnet and OUT/static exported from `glancefocus demo`'s files; OUT/images: PNG
        files of cluttered-MNIST test canvases.
    python benchmarks/serve_models.py demo OUT
        the same without a trained demo: the demo preset and its static CNN with random weights
        (exits calibrated on their own outputs for the canvases; chance-level answers), for
        measuring the server's own cost in seconds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from glancefocus import create_model, exits
from glancefocus.cli import main as cli
from glancefocus.config import DataConfig
from glancefocus.encoder import create_backbone
from glancefocus.export import export_onnx, export_static_onnx

CALIBRATION, VALIDATION = 128, 64


def smooth_random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """[n, 3, size, size] in [0, 1]: smooth random structure plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 7, 7, generator=g), size=size,
                                             mode="bilinear", align_corners=False)
    return (coarse + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def resnet50(out: Path, n_images: int) -> None:
    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (smooth_random_images(CALIBRATION + VALIDATION, 224, 1) - mean) / std
    with torch.inference_mode():
        logits = torch.cat([model(chunk).logits for chunk in pixels.split(16)], dim=1)
    conf, pred = exits.confidences_from_logits(logits)
    labels = torch.randint(1000, (pixels.shape[0],), generator=torch.Generator().manual_seed(2))
    c, v = slice(0, CALIBRATION), slice(CALIBRATION, None)
    model.exit_curve = exits.budgeted_curve(conf[:, c], conf[:, v], pred[:, v], labels[v],
                                            model.macs()["per_step"])
    export_onnx(model, out / "gfnet", image_size=224, source="resnet50 preset, random weights")
    static = create_backbone("resnet50", num_classes=1000, in_chans=3, pretrained=False).eval()
    export_static_onnx(static, DataConfig(), 3, out / "static", "resnet50",
                       source="resnet50, random weights")
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(smooth_random_images(n_images, 256, 3)):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:04d}.jpg", quality=90)


def demo(out: Path, checkpoint: Optional[str], static: Optional[str], n_images: int) -> None:
    from glancefocus.checkpoint import load_checkpoint
    from glancefocus.data.cluttered_mnist import ClutteredMNIST
    from glancefocus.evaluate import data_config_for

    if checkpoint:
        assert cli(["export", checkpoint, str(out / "gfnet")]) == 0
        assert cli(["export", static, str(out / "static")]) == 0
        model = load_checkpoint(checkpoint)
    else:
        torch.manual_seed(0)
        model = create_model("demo").eval()
    data = data_config_for(getattr(model, "run_config", None)
                           or {"model": {"arch": model.config.arch}})
    section = {k: getattr(data, k) for k in DataConfig.__dataclass_fields__}
    section.update(test_canvases=max(n_images, CALIBRATION + VALIDATION))
    canvases = ClutteredMNIST(DataConfig(**section), "test", channels=1)
    if not checkpoint:  # random weights: exits calibrated on their own outputs, as resnet50's
        pixels = torch.stack([canvases[i][0] for i in range(CALIBRATION + VALIDATION)])
        with torch.inference_mode():
            conf, pred = exits.confidences_from_logits(model(pixels).logits)
        labels = torch.as_tensor(canvases.labels[:CALIBRATION + VALIDATION])
        c, v = slice(0, CALIBRATION), slice(CALIBRATION, None)
        model.exit_curve = exits.budgeted_curve(conf[:, c], conf[:, v], pred[:, v], labels[v],
                                                model.macs()["per_step"])
        export_onnx(model, out / "gfnet", source="demo preset, random weights")
        backbone = create_backbone(model.config.arch, num_classes=model.config.num_classes,
                                   in_chans=1, pretrained=False).eval()
        export_static_onnx(backbone, data, 1, out / "static", model.config.arch,
                           source="demo_cnn, random weights")
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in range(n_images):
        tensor, label = canvases[i][0], int(canvases.labels[i])
        # the canvas as the 8-bit file a user would send (undo the normalisation)
        array = (tensor[0] * torch.tensor(data.std[0]) + torch.tensor(data.mean[0])) * 255
        name = f"{i:04d}.png"
        Image.fromarray(array.round().clamp(0, 255).numpy().astype(np.uint8)).save(folder / name)
        labels[name] = label
    (out / "labels.json").write_text(json.dumps(labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=("resnet50", "demo"))
    p.add_argument("out")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--checkpoint")
    p.add_argument("--static")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    if args.which == "resnet50":
        resnet50(out, args.images)
    else:
        demo(out, args.checkpoint, args.static, args.images)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
