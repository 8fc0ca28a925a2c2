"""`glancefocus predict IMAGE...`: classify image files with real early exit.

IMAGE may be a file, a folder (its image files, searched recursively, in sorted order) or a
glob such as 'photos/**/*.jpg' (quoted, so that the command expands it: also on shells that do
not). Each file is read with data.load_image (any image Pillow reads, converted to the model's
channels), turned into the model's input by `transforms.create_transform` (the checkpoint's
evaluation preprocessing), and classified in batches by the early-exit predictor. A file that
cannot be read gets a one-line error naming it; the others still get their answers, and the exit
status says whether any failed.

Boxes are reported in the pixels of the original file: the model's input is the file resized and
centre-cropped, and each box is mapped back through that resize and crop.

`--exported DIR` runs a model written by `glancefocus export` on onnxruntime instead, with the
same output; that path imports neither PyTorch nor torchvision (this module imports them only
for `--checkpoint`).
"""
from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from glancefocus_runtime.images import IMAGE_EXTENSIONS

from .cli import HelpFormatter

if TYPE_CHECKING:
    import torch

    from glancefocus_runtime import ExportedPredictor

GLOB_CHARACTERS = "*?["
STEP_LEGEND = ("steps: how many steps ran; 1 = the glance (the whole input, shrunk) alone, "
               "k = the glance and k-1 focus patches")


def format_macs(macs: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if macs >= scale:
            return f"{macs / scale:.2f}{unit}"
    return f"{macs:.0f}"


# ----------------------------------------------------------------------------------------------
# which files

def is_image_file(name: str) -> bool:
    return not os.path.basename(name).startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def images_in_folder(folder) -> list:
    """The image files under `folder`, recursively, sorted by path (hidden files skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, name) for name in filenames if is_image_file(name)]
    return sorted(found)


def expand_inputs(items) -> tuple[list, dict]:
    """Files, folders and globs -> (image paths in order, without repeats; {item: error}).

    A file is taken as given (a missing or unreadable one is reported when it is read); a folder
    and a glob give their image files (by extension), and an error when they give none.
    """
    paths, errors = [], {}
    for item in map(str, items):
        if os.path.isdir(item):
            found = images_in_folder(item)
            if not found:
                errors[item] = (f"folder '{item}' holds no image files "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        elif any(c in item for c in GLOB_CHARACTERS) and not os.path.exists(item):
            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                found += images_in_folder(match) if os.path.isdir(match) else (
                    [match] if is_image_file(match) else [])
            if not found:
                errors[item] = f"no image files match '{item}'"
        else:
            found = [item]
        paths += found
    return list(dict.fromkeys(paths)), errors


# ----------------------------------------------------------------------------------------------
# predicting

@dataclass
class FilePrediction:
    """The answer for one file, boxes in the original file's pixels."""

    path: str
    prediction: Any             # predictor.Prediction or runtime.Prediction (the same fields)
    original_size: tuple        # (width, height) of the file
    boxes: list                 # [exit_step][4] (x0, y0, x1, y1) in the original file's pixels

    def to_dict(self) -> dict:
        p = self.prediction
        return {"file": self.path, "label": p.label, "class_name": p.class_name,
                "confidence": p.confidence, "exit_step": p.exit_step, "macs": p.macs,
                "top_k": p.top_k, "original_size": list(self.original_size),
                "boxes_in_original_pixels": self.boxes, "boxes_in_model_input": p.boxes}


def read_images(paths, transform):
    """(PIL images of the readable files, their paths, {path: error message} of the others)."""
    images, good, errors = [], [], {}
    for path in paths:
        try:
            images.append(transform.load(path))
            good.append(path)
        except ValueError as exc:  # ImageReadError: the message names the file
            message = str(exc)
            errors[path] = message if str(path) in message else f"'{path}': {message}"
    return images, good, errors


def model_device(model) -> "torch.device":
    return next(model.parameters()).device


def predict_files(model, paths, budget: Optional[float] = None, batch_size: int = 64,
                  on_batch: Optional[Callable] = None, top_k: int = 1):
    """Predict every readable file, on the model's device. Returns (results [FilePrediction],
    errors {path: message}, the predictor). on_batch(results, PIL images) sees each batch."""
    import torch

    from .predictor import Predictor
    from .transforms import create_transform

    predictor = Predictor(model, budget=budget, top_k=top_k)  # fails early when no budget fits
    transform = create_transform(model)
    device = model_device(model)
    return _predict_batches(predictor, transform, paths, batch_size, on_batch,
                            lambda arrays: torch.stack(arrays).to(device))


def predict_exported(predictor: "ExportedPredictor", paths, batch_size: int = 64,
                     on_batch: Optional[Callable] = None):
    """predict_files for an exported model on onnxruntime (numpy and PIL only)."""
    import numpy as np

    return _predict_batches(predictor, predictor.model.transform(), paths, batch_size, on_batch,
                            np.stack)


def _predict_batches(predictor, transform, paths, batch_size: int, on_batch: Optional[Callable],
                     stack: Callable):
    """Read, transform and predict the files in batches (either engine)."""
    results, errors = [], {}
    for start in range(0, len(paths), batch_size):
        images, good, failed = read_images(paths[start:start + batch_size], transform)
        tensors, kept, pictures = [], [], []
        for path, image in zip(good, images):
            try:
                tensors.append(transform(image))
                kept.append(path)
                pictures.append(image)
            except ValueError as exc:  # e.g. ImageTooSmallError with data.small_images='error'
                failed[path] = f"'{path}': {exc}"
        errors.update(failed)
        if not tensors:
            continue
        predictions = predictor.predict(stack(tensors))
        batch = [FilePrediction(str(path), p, image.size,
                                transform.boxes_to_original(p.boxes, image.size))
                 for path, p, image in zip(kept, predictions, pictures)]
        results += batch
        if on_batch is not None:
            on_batch(batch, pictures)
    return results, errors, predictor


# ----------------------------------------------------------------------------------------------
# output

def class_text(label: int, class_name: Optional[str]) -> str:
    return class_name if class_name is not None else str(label)


def print_table(results, top_k: int = 1) -> None:
    header = ["file", "class", "confidence", "steps", "MACs"]
    if top_k > 1:
        header.append(f"top-{top_k} (probability)")
    rows = []
    for r in results:
        p = r.prediction
        row = [r.path, class_text(p.label, p.class_name), f"{p.confidence:.3f}", str(p.exit_step),
               format_macs(p.macs)]
        if top_k > 1:
            row.append(", ".join(f"{class_text(c['label'], c['class_name'])} {c['probability']:.3f}"
                                 for c in p.top_k))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(STEP_LEGEND)


def draw_overlay(image, result: FilePrediction, path: Path) -> None:
    """The original file with the boxes looked at, numbered by step: 1 the glance (blue, the
    part of the file the model's input covers), 2.. the focus patches (orange), as a PNG."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .atomic import write_atomic

    prediction = result.prediction
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    pixels = np.asarray(image)
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
    width = result.original_size[0]
    for step, (x0, y0, x1, y1) in enumerate(result.boxes, start=1):
        glance = step == 1
        colour = "tab:blue" if glance else "tab:orange"
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               linewidth=3 if glance else 2, edgecolor=colour))
        # shifted per step: patches at the same place keep readable numbers
        shift = max(step - 2, 0) * 0.06 * width
        ax.text(x0 + 1 + shift, y0 + 1, str(step), color="white", fontsize=10, va="top",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1})
    ax.set_title(f"{class_text(prediction.label, prediction.class_name)}  "
                 f"({prediction.confidence:.2f}, {prediction.exit_step} steps, "
                 f"{format_macs(prediction.macs)} MACs)\n1 = glance, 2.. = focus patches",
                 fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def overlay_paths(paths, folder: Path) -> dict:
    """DIR/<stem>.png per file; a repeated stem gets -2, -3, ..."""
    used, out = set(), {}
    for path in paths:
        stem, name, n = Path(path).stem, Path(path).stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out[str(path)] = folder / f"{name}.png"
    return out


# ----------------------------------------------------------------------------------------------
# the command

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify image files, folders or globs with early exit",
        description="Classify images with early exit: each image stops at the first step that is "
                    "confident enough for the budget. " + STEP_LEGEND + ".",
        formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively, sorted) or quoted globs "
                        "such as 'photos/**/*.jpg'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a glancefocus checkpoint (.pt), run with PyTorch "
                                             "(default: none; give it or --exported)")
    source.add_argument("--exported", metavar="DIR",
                        help="a folder written by `glancefocus export`: run it on onnxruntime, "
                             "CPU, no PyTorch needed (default: none; give it or --checkpoint)")
    p.add_argument("--budget", type=float, default=None, metavar="MACS",
                   help="average multiply-adds per image to aim at, e.g. 10e6 (needs thresholds "
                        "calibrated by `glancefocus evaluate`); must lie within the calibrated "
                        "curve's range (default: none, every image runs every step)")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="list the K most probable classes with their probabilities")
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1, ... "
                        "(with --checkpoint)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads with --exported (default: onnxruntime's choice)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of a table; boxes in the original file's "
                        "pixels (boxes_in_original_pixels) and in the model's input")
    p.add_argument("--visualize", metavar="DIR", default=None,
                   help="write DIR/<stem>.png: the file with the boxes looked at, 1 = the glance, "
                        "2.. = the focus patches (default: no pictures)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling an authors' *.pth.tar (only for files you trust)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.top_k <= 0:
        raise ValueError(f"--top-k must be > 0, got {args.top_k}")
    paths, input_errors = expand_inputs(args.images)
    on_batch = None
    if args.visualize:
        targets = overlay_paths(paths, Path(args.visualize))

        def on_batch(batch, images):
            for result, image in zip(batch, images):
                draw_overlay(image, result, targets[result.path])

    if args.exported:
        header, results, errors, predictor = _run_exported(args, paths, on_batch)
    else:
        header, results, errors, predictor = _run_checkpoint(args, paths, on_batch)
    errors = {**input_errors, **errors}
    for message in errors.values():
        print(f"glancefocus predict: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            **header,
            "budget": args.budget,
            "thresholds": [float(t) for t in predictor.thresholds],
            "predictions": [r.to_dict() for r in results],
            "errors": [{"file": str(path), "error": message} for path, message in errors.items()],
        }, indent=2))
    elif results:
        print_table(results, predictor.top_k)
    return 1 if errors else 0


def _run_checkpoint(args, paths, on_batch):
    """--checkpoint: the PyTorch model. Returns (JSON header, results, errors, predictor)."""
    try:
        from .checkpoint import load_checkpoint
        from .predictor import resolve_device
    except ImportError as exc:
        raise ValueError(f"--checkpoint needs PyTorch, which cannot be imported here ({exc}); "
                         "run a model written by `glancefocus export` with --exported DIR "
                         "instead") from None
    device = resolve_device(args.device)
    model = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle).to(device)
    results, errors, predictor = predict_files(model, paths, args.budget, args.batch_size,
                                               on_batch, args.top_k)
    return {"checkpoint": str(args.checkpoint), "device": str(device)}, results, errors, predictor


def _run_exported(args, paths, on_batch):
    """--exported: the ONNX graphs on onnxruntime, without PyTorch."""
    from glancefocus_runtime import ExportedPredictor

    if args.trust_pickle:
        raise ValueError("--trust-pickle applies to --checkpoint only: an exported folder holds "
                         "no pickles")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be > 0, got {args.threads}")
    predictor = ExportedPredictor(args.exported, budget=args.budget, top_k=args.top_k,
                                  threads=args.threads)
    results, errors, predictor = predict_exported(predictor, paths, args.batch_size, on_batch)
    header = {"exported": str(args.exported), "device": "cpu", "engine": "onnxruntime"}
    return header, results, errors, predictor
