"""`glancefocus predict IMAGE...`: classify image files with real early exit.

Each file is read with data.load_image (any image Pillow reads, converted to the model's
channels), given the checkpoint's evaluation transforms, and classified in batches by the
early-exit predictor. A file that cannot be read gets a one-line error naming it; the others
still get their answers, and the exit status says whether any failed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import load_checkpoint
from .config import DataConfig, from_dict, to_dict
from .data import build_transforms, load_image
from .evaluate import preset_data_section
from .predictor import Prediction, Predictor


def evaluation_transform(model):
    """PIL image -> the tensor the model was evaluated on (the stored data config's transforms)."""
    run_config = getattr(model, "run_config", None) or {"model": to_dict(model.config)}
    section = dict(run_config.get("data") or preset_data_section(model.config.arch))
    section.pop("root", None)  # not needed to transform a single file
    data = from_dict(DataConfig, section, prefix="data.")
    if data.dataset == "cluttered-mnist":
        # canvases are used whole: scale the file to the canvas, no border cut off
        data = dataclasses.replace(data, resize_size=data.image_size)
    return build_transforms(data, train=False, channels=model.config.in_chans), data


def format_macs(macs: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if macs >= scale:
            return f"{macs / scale:.2f}{unit}"
    return f"{macs:.0f}"


def read_images(paths, transform, channels: int):
    """(tensors of the readable files, their paths, {path: error message} of the others)."""
    tensors, good, errors = [], [], {}
    for path in paths:
        try:
            tensors.append(transform(load_image(path, channels)))
            good.append(path)
        except ValueError as exc:  # ImageReadError, ImageTooSmallError: the message names the file
            message = str(exc)
            errors[path] = message if str(path) in message else f"'{path}': {message}"
    return tensors, good, errors


def predict_files(model, paths, budget: Optional[float] = None, batch_size: int = 64,
                  on_batch: Optional[Callable] = None):
    """Predict every readable file. Returns (results [(path, Prediction)], errors {path: message},
    the predictor). on_batch(paths, input tensors, predictions) sees each batch as it is done."""
    predictor = Predictor(model, budget=budget)  # fails early when no curve fits the budget
    transform, _ = evaluation_transform(model)
    results, errors = [], {}
    for start in range(0, len(paths), batch_size):
        tensors, good, failed = read_images(paths[start:start + batch_size], transform,
                                            model.config.in_chans)
        errors.update(failed)
        if not tensors:
            continue
        predictions = predictor.predict(torch.stack(tensors))
        results += list(zip(good, predictions))
        if on_batch is not None:
            on_batch(good, tensors, predictions)
    return results, errors, predictor


# ----------------------------------------------------------------------------------------------
# output

def print_table(results) -> None:
    rows = [(str(path), p.class_name if p.class_name is not None else str(p.label),
             f"{p.confidence:.3f}", str(p.exit_step), format_macs(p.macs)) for path, p in results]
    header = ("file", "class", "confidence", "steps", "MACs")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def draw_overlay(image: torch.Tensor, prediction: Prediction, data: DataConfig, path: Path) -> None:
    """The model's input image with the glance and the numbered patch boxes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .atomic import atomic_path

    channels = image.shape[0]
    mean = torch.tensor(list(data.mean)).view(-1, 1, 1)
    std = torch.tensor(list(data.std)).view(-1, 1, 1)
    pixels = (image * std + mean).clamp(0, 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    if channels == 1:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(pixels.permute(1, 2, 0).numpy())
    for step, (x0, y0, x1, y1) in enumerate(prediction.boxes, start=1):
        glance = step == 1
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               linewidth=3 if glance else 2,
                               edgecolor="tab:blue" if glance else "tab:orange"))
        if not glance:  # shifted per step: patches at the same place keep readable numbers
            shift = (step - 2) * 0.06 * image.shape[-1]
            ax.text(x0 + 1 + shift, y0 + 1, str(step - 1), color="white", fontsize=10, va="top",
                    bbox=dict(facecolor="tab:orange", edgecolor="none", pad=1))
    name = prediction.class_name if prediction.class_name is not None else str(prediction.label)
    ax.set_title(f"{name}  ({prediction.confidence:.2f}, {prediction.exit_step} steps, "
                 f"{format_macs(prediction.macs)} MACs)", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def overlay_paths(paths, folder: Path) -> dict:
    """DIR/<stem>.png per file; a repeated stem gets -2, -3, ..."""
    used, out = set(), {}
    for path in paths:
        stem, name, n = Path(path).stem, Path(path).stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out[path] = folder / f"{name}.png"
    return out


# ----------------------------------------------------------------------------------------------
# the command

def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify image files with early exit")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--budget", type=float, default=None, metavar="MACS",
                   help="MACs per image to aim at (needs thresholds calibrated by `glancefocus "
                        "evaluate`); default: every step for every image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--visualize", metavar="DIR", default=None,
                   help="write DIR/<stem>.png: the image with the glance and the patches looked at")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling an authors' *.pth.tar (only for files you trust)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    model = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    on_batch = None
    if args.visualize:
        _, data = evaluation_transform(model)
        targets = overlay_paths(args.images, Path(args.visualize))

        def on_batch(paths, tensors, predictions):
            for path, image, prediction in zip(paths, tensors, predictions):
                draw_overlay(image, prediction, data, targets[path])

    results, errors, predictor = predict_files(model, list(args.images), args.budget,
                                               args.batch_size, on_batch)
    for message in errors.values():
        print(f"glancefocus predict: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "checkpoint": str(args.checkpoint),
            "budget": args.budget,
            "thresholds": predictor.thresholds.tolist(),
            "predictions": [dict(file=str(path), **p.to_dict()) for path, p in results],
            "errors": [{"file": str(path), "error": message} for path, message in errors.items()],
        }, indent=2))
    elif results:
        print_table(results)
    return 1 if errors else 0
