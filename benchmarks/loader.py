"""Can the data loader keep up with the training step? Images per second of each, measured apart.

    python benchmarks/loader.py [--images 300] [--batch 32] [--steps 3] [--workers 0,1,2,-1]
                                [--preset mobilenetv3_large_100] [--json FILE]

(a) The training loader alone (glancefocus.train.loaders.make_loader, as training builds it):
    decode + RandomResizedCrop(224) + horizontal flip + ToTensor + Normalize, batches of --batch,
    at each --workers count (-1: the automatic count, resolved for this machine's device). The
    images are --images JPEGs of 500 x 375 (quality 90, smooth random colour fields with noise,
    so they decode like photographs rather than like flat colour), written to a temporary folder.
    Worker start-up counts: training builds a loader per epoch, so it pays it every epoch.
(b) One stage-1 training step of --preset with pretrained=false (forward with random patch
    locations, backward, SGD step) on a batch of --batch random 224 x 224 images, in float32 and
    in bf16 autocast (--amp), on the GPU when there is one, else the CPU; one warm-up step, then
    the median of --steps.
Prints (and with --json writes) one JSON object. Compare (a) with (b): while the loader delivers
more images per second than the step consumes, the device does not wait for data.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glancefocus.config import DataConfig, load_config
from glancefocus.data import ImageFolderDataset
from glancefocus.model import GlanceFocusNet
from glancefocus.presets import get_preset
from glancefocus.train.loaders import make_loader, resolve_num_workers
from glancefocus.train.runtime import Runtime
from glancefocus.train.supervised import GlanceFocusLoss

WIDTH, HEIGHT = 500, 375


def write_jpegs(root: Path, count: int, classes: int = 4) -> Path:
    """ROOT/train/<class>/*.jpg: smooth colour fields plus noise, like a photograph's detail."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (HEIGHT // 25 + 1, WIDTH // 25 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def loader_rate(root: Path, workers: int, batch: int, runtime: Runtime, limit=None) -> dict:
    """Images per second of one epoch (or `limit` batches) of the training loader, worker
    start-up included."""
    dataset = ImageFolderDataset(root, "train", DataConfig(root=str(root)), train=True)
    began = time.perf_counter()
    loader = make_loader(dataset, batch, runtime, seed=0, epoch=0, shuffle=True, num_workers=workers)
    seen = sum(images.shape[0] for images, _ in itertools.islice(loader, limit))
    seconds = time.perf_counter() - began
    return {"workers": workers, "resolved_workers": resolve_num_workers(workers, runtime.device),
            "images": seen, "seconds": round(seconds, 3), "images_per_second": round(seen / seconds, 1)}


def step_rate(preset: str, batch: int, steps: int, amp: str, runtime: Runtime) -> dict:
    """Images per second of stage-1 training steps on random 224 px images."""
    config = load_config(None, ["model.pretrained=false", "model.num_classes=1000"],
                         base=get_preset(preset))
    torch.manual_seed(0)
    model = GlanceFocusNet(config.model).to(runtime.device).train()
    loss_module = GlanceFocusLoss(model, config.train.stage1.dsn_ratio, random_locations=True)
    stage = config.train.stage1  # one SGD step over every trained weight, as stage 1 takes
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=stage.backbone_lr, momentum=stage.momentum, nesterov=True)
    images = torch.randn(batch, 3, 224, 224, device=runtime.device)
    labels = torch.randint(0, config.model.num_classes, (batch,), device=runtime.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[amp]
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(runtime.device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = loss_module(images, labels)
        loss.backward()
        optimizer.step()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    median = statistics.median(times[1:])
    return {"preset": preset, "amp": amp, "batch": batch, "step_seconds": round(median, 4),
            "images_per_second": round(batch / median, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2,-1", help="comma-separated worker counts")
    parser.add_argument("--preset", default="mobilenetv3_large_100")
    parser.add_argument("--amp", default="fp32,bf16", help="training-step precisions ('' skips them)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = Runtime(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {"device": str(device), "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
              "jpeg": f"{WIDTH}x{HEIGHT}", "images": args.images}
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        root = write_jpegs(Path(folder), args.images)
        result["jpeg_bytes_mean"] = round(sum(p.stat().st_size for p in root.rglob("*.jpg")) / args.images)
        result["write_seconds"] = round(time.perf_counter() - began, 2)
        loader_rate(root, 0, args.batch, runtime, limit=2)  # warm-up: imports, Pillow's plugins
        result["loader"] = [loader_rate(root, int(w), args.batch, runtime) for w in args.workers.split(",")]
    result["train_step"] = [step_rate(args.preset, args.batch, args.steps, amp, runtime)
                            for amp in filter(None, args.amp.split(","))]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
