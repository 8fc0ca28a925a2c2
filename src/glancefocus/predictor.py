"""Real early exit: run a GFNet step by step and drop every image that is confident enough.

The authors run every step for every image and simulate the exits afterwards (exits.py); the
saving is on paper only. Here an image that meets its step's threshold leaves the batch, so later
steps compute only on the images still running. The rule is the simulation's: an image exits at
the first step whose max softmax probability (float32 softmax, compared in float64) is >= that
step's threshold, and at the last step in any case. On the same images and thresholds the labels
and exit steps equal `exits.simulate_exits` on the all-steps logits (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from glancefocus_runtime.predictor import Prediction  # one answer type for both engines

from . import exits

NO_CURVE_HINT = ("the model has no calibrated exit curve (thresholds and MACs per budget); run "
                 "`glancefocus evaluate --checkpoint CKPT --out DIR` once and use DIR/model.pt, "
                 "the copy with the calibrated exits (or add --in-place to store them in CKPT), "
                 "or give explicit thresholds")


@dataclass
class ExitBatch:
    """The answers for a batch, as tensors (cheap: no Python object per image)."""

    labels: torch.Tensor       # [N] long
    confidences: torch.Tensor  # [N] float32
    exit_steps: torch.Tensor   # [N] long, 1-based
    macs: torch.Tensor         # [N] long
    boxes: torch.Tensor        # [N, T, 4] long; rows after an image's exit step are -1
    top_probabilities: torch.Tensor  # [N, K] float32: the K most probable classes at the exit
    top_labels: torch.Tensor         # [N, K] long


class Predictor:
    """Early-exit inference at a MACs budget or with explicit thresholds.

    budget: MACs per image; picks the calibrated thresholds of the most expensive budget that fits
    (model.exit_curve, see `glancefocus evaluate`). Below the curve's cheapest budget it raises
    exits.BudgetOutOfRangeError; above its most expensive one it warns
    (exits.BudgetAboveCurveWarning) and uses that one. thresholds: [T] confidences, one per step.
    Neither: every image runs every step. top_k: how many of the most probable classes each
    Prediction lists (with their probabilities at the exit step).
    """

    def __init__(self, model, thresholds: Union[None, Sequence[float], torch.Tensor] = None,
                 budget: Optional[float] = None, top_k: int = 1):
        if thresholds is not None and budget is not None:
            raise ValueError("give a MACs budget or explicit thresholds, not both")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model = model
        self.top_k = min(int(top_k), model.config.num_classes)
        self.budget_index = None   # which calibrated budget of model.exit_curve is used
        steps = model.config.max_steps
        if budget is not None:
            curve = getattr(model, "exit_curve", None)
            if not curve or not curve.get("thresholds") or not curve.get("macs"):
                raise ValueError(f"cannot run at a budget of {budget:.6g} MACs: {NO_CURVE_HINT}")
            self.budget_index = exits.budget_index(curve, float(budget))
            thresholds = curve["thresholds"][self.budget_index]
        if thresholds is None:
            thresholds = [exits.BIG] * (steps - 1) + [-exits.BIG]  # nobody exits before the end
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64).flatten().cpu()
        if self.thresholds.numel() != steps:
            raise ValueError(f"need {steps} thresholds (one per step), got {self.thresholds.numel()}")
        # cumulative MACs of running k steps; counting runs a forward pass, so do it once
        self.step_macs = torch.tensor(model.macs()["per_step"], dtype=torch.long)

    def run(self, images: torch.Tensor) -> ExitBatch:
        """Early-exit inference on a batch [N, C, H, W] (on the model's device)."""
        model = self.model
        steps = model.config.max_steps
        n = images.shape[0]
        labels = torch.zeros(n, dtype=torch.long)
        confidences = torch.zeros(n, dtype=torch.float32)
        exit_steps = torch.zeros(n, dtype=torch.long)
        boxes = torch.full((n, steps, 4), -1, dtype=torch.long)
        top_probabilities = torch.zeros(n, self.top_k, dtype=torch.float32)
        top_labels = torch.zeros(n, self.top_k, dtype=torch.long)
        running = torch.arange(n)           # batch indices of the images still running
        was_training = model.training
        model.eval()                        # BatchNorm statistics and the policy's mean
        try:
            with torch.inference_mode():
                out = model.step(images)
                for step in range(1, steps + 1):
                    if step > 1:
                        out = model.step(images, out.state)
                    conf, pred = exits.confidences_from_logits(out.logits[None])
                    conf, pred = conf[0].cpu(), pred[0].cpu()
                    boxes[running, step - 1] = out.box.cpu()
                    done = conf.double() >= self.thresholds[step - 1]
                    if step == steps:
                        done[:] = True
                    finished = running[done]
                    labels[finished] = pred[done]
                    confidences[finished] = conf[done]
                    exit_steps[finished] = step
                    if bool(done.any()):
                        probs, classes = _top_classes(out.logits[done.to(out.logits.device)],
                                                      self.top_k)
                        top_probabilities[finished] = probs
                        top_labels[finished] = classes
                    if step == steps or bool(done.all()):
                        break
                    if bool(done.any()):
                        # the exited images leave the batch: later steps never compute on them
                        keep = ~done
                        running = running[keep]
                        keep = keep.to(images.device)
                        images = images[keep]
                        out.state = out.state.select(keep)
        finally:
            model.train(was_training)
        return ExitBatch(labels=labels, confidences=confidences, exit_steps=exit_steps,
                         macs=self.step_macs[exit_steps - 1], boxes=boxes,
                         top_probabilities=top_probabilities, top_labels=top_labels)

    def predict(self, images: torch.Tensor) -> list[Prediction]:
        """Early-exit inference on a batch, one Prediction per image."""
        batch = self.run(images)
        names = getattr(self.model, "class_names", None)
        answers = []
        for i in range(images.shape[0]):
            label, step = int(batch.labels[i]), int(batch.exit_steps[i])
            answers.append(Prediction(
                label=label,
                class_name=_name(names, label),
                confidence=float(batch.confidences[i]),
                exit_step=step,
                macs=int(batch.macs[i]),
                boxes=batch.boxes[i, :step].tolist(),
                top_k=[{"label": int(c), "class_name": _name(names, int(c)), "probability": float(p)}
                       for p, c in zip(batch.top_probabilities[i], batch.top_labels[i])],
            ))
        return answers


def _name(names, label: int) -> Optional[str]:
    return names[label] if names and label < len(names) else None


def _top_classes(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest softmax probabilities (float32 softmax, as the exit rule) and their classes."""
    probs = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), -1)
    top = probs.topk(k, dim=-1)
    return top.values.float().cpu(), top.indices.cpu()


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': the GPU when there is one, else the CPU; otherwise a torch device name that must
    be usable here (e.g. cpu, cuda, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def predict(model, images: torch.Tensor, budget: Optional[float] = None,
            thresholds: Union[None, Sequence[float], torch.Tensor] = None,
            top_k: int = 1) -> list[Prediction]:
    """Early-exit predictions for a batch of images (see Predictor)."""
    return Predictor(model, thresholds=thresholds, budget=budget, top_k=top_k).predict(images)
