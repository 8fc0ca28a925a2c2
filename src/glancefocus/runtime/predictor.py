"""Early exit on onnxruntime: run the exported step graphs and drop the images that exit.

The loop, the threshold choice and the answers are those of `glancefocus.predictor.Predictor`
(the same exit rule, from exit_rule.py); only the engine differs. numpy, PIL and onnxruntime
only: no PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import exit_rule
from .images import ImageInput, Preprocess
from .manifest import load_manifest
from .onnx_deps import require_onnxruntime

NO_CURVE_HINT = ("the exported model has no calibrated exit curve (manifest 'exit_curve' is "
                 "empty): run `glancefocus evaluate --checkpoint CKPT --out DIR`, export "
                 "DIR/model.pt again, or give explicit thresholds")


@dataclass
class Prediction:
    """The answer for one image (also what glancefocus.predictor, on PyTorch, returns)."""

    label: int
    class_name: Optional[str]
    confidence: float          # max softmax probability at the exit step
    exit_step: int             # 1-based: 1 = the glance alone
    macs: int                  # multiply-adds spent on this image
    boxes: list                # [exit_step][4] (x0, y0, x1, y1) looked at, in model-input pixels
    top_k: list = field(default_factory=list)  # [{label, class_name, probability}], best first

    def to_dict(self) -> dict:
        return {"label": self.label, "class_name": self.class_name, "confidence": self.confidence,
                "exit_step": self.exit_step, "macs": self.macs, "boxes": self.boxes,
                "top_k": self.top_k}


@dataclass
class ExitBatch:
    """The answers for a batch, as arrays."""

    labels: np.ndarray            # [N] int64
    confidences: np.ndarray       # [N] float32
    exit_steps: np.ndarray        # [N] int64, 1-based
    macs: np.ndarray              # [N] int64
    boxes: np.ndarray             # [N, T, 4] int64; rows after the exit step are -1
    top_probabilities: np.ndarray  # [N, K] float32
    top_labels: np.ndarray         # [N, K] int64


class ExportedModel:
    """The graphs and manifest of a folder written by `glancefocus export`.

    threads: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, folder: Union[str, Path], threads: Optional[int] = None):
        ort = require_onnxruntime()
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.max_steps = int(self.manifest["max_steps"])
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = self.manifest.get("class_names")
        self.exit_curve = self.manifest.get("exit_curve")
        self.step_macs = np.asarray(self.manifest["macs_per_step"], dtype=np.int64)
        spec = self.manifest["input"]
        self.input_shape = (int(spec["channels"]), int(spec["height"]), int(spec["width"]))
        self.state_axis = dict(self.manifest["state_batch_axis"])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # The steps alternate between two sessions, each with its own thread pool. Spinning
        # threads of the idle session took the cores from the running one: with spinning on,
        # the demo ran up to 1.7x slower (2 cores, batch 256).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        sessions = {}
        for entry in self.manifest["steps"]:
            name = entry["graph"]
            if name not in sessions:
                sessions[name] = ort.InferenceSession(str(self.folder / name), options,
                                                      providers=["CPUExecutionProvider"])
        self.steps = [sessions[entry["graph"]] for entry in self.manifest["steps"]]
        self.output_names = [[o.name for o in s.get_outputs()] for s in self.steps]

    def transform(self) -> Preprocess:
        """The preprocessing the model was exported with (as create_transform's)."""
        return Preprocess(self.manifest["preprocessing"])

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """`images` as float32 [N, C, H, W] of the exported input size, or a clear error."""
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            channels, height, width = self.input_shape
            raise ValueError(f"images must be [N, {channels}, {height}, {width}] (the exported "
                             f"input size, manifest 'input' of {self.folder}), got shape "
                             f"{list(images.shape)}: preprocess them with "
                             "ExportedModel.transform()")
        return np.ascontiguousarray(images, dtype=np.float32)

    def step(self, k: int, images: np.ndarray, state: Optional[dict] = None) -> dict:
        """Step k (1 = the glance) on a batch: {'logits', 'next_<state>'..., ['location'],
        'box'}; `state` maps the state names (manifest 'state_batch_axis') to arrays."""
        feed = {"images": images, **(state or {})}
        return dict(zip(self.output_names[k - 1], self.steps[k - 1].run(None, feed)))

    def select(self, outputs: dict, keep: np.ndarray) -> dict:
        """The state of the images still running (each state tensor along its batch axis)."""
        return {name: np.ascontiguousarray(np.compress(keep, outputs[f"next_{name}"], axis=axis))
                for name, axis in self.state_axis.items()}


class ExportedPredictor:
    """Early-exit inference with an exported model, at a MACs budget or with thresholds.

    Budgets and thresholds work as in glancefocus.predictor.Predictor: a budget picks the
    calibrated thresholds of the most expensive budget that fits (below the curve: an error;
    above it: a warning); neither means every image runs every step.
    """

    def __init__(self, model: Union[ExportedModel, str, Path],
                 thresholds: Optional[Sequence[float]] = None, budget: Optional[float] = None,
                 top_k: int = 1, threads: Optional[int] = None):
        if thresholds is not None and budget is not None:
            raise ValueError("give a MACs budget or explicit thresholds, not both")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model = model if isinstance(model, ExportedModel) else ExportedModel(model, threads)
        self.top_k = min(int(top_k), self.model.num_classes)
        self.budget_index = None
        if budget is not None:
            curve = self.model.exit_curve
            if not exit_rule.has_curve(curve):
                raise ValueError(f"cannot run at a budget of {budget:.6g} MACs: {NO_CURVE_HINT}")
            self.budget_index = exit_rule.budget_index(curve, float(budget))
            thresholds = curve["thresholds"][self.budget_index]
        if thresholds is None:
            thresholds = exit_rule.never_exit_thresholds(self.model.max_steps)
        self.thresholds = exit_rule.as_thresholds(thresholds, self.model.max_steps)

    def run(self, images: np.ndarray) -> ExitBatch:
        """Early-exit inference on preprocessed images [N, C, H, W]."""
        model = self.model
        images = model.check_images(images)
        steps, n = model.max_steps, images.shape[0]
        labels = np.zeros(n, dtype=np.int64)
        confidences = np.zeros(n, dtype=np.float32)
        exit_steps = np.zeros(n, dtype=np.int64)
        boxes = np.full((n, steps, 4), -1, dtype=np.int64)
        top_probabilities = np.zeros((n, self.top_k), dtype=np.float32)
        top_labels = np.zeros((n, self.top_k), dtype=np.int64)
        running = np.arange(n)
        state = None
        for step in range(1, steps + 1):
            outputs = model.step(step, images, state)
            conf, pred = exit_rule.softmax_confidences(outputs["logits"])
            boxes[running, step - 1] = outputs["box"]
            done = exit_rule.exits_now(conf, self.thresholds[step - 1], step == steps)
            finished = running[done]
            labels[finished], confidences[finished] = pred[done], conf[done]
            exit_steps[finished] = step
            if done.any():
                probs, classes = _top_classes(outputs["logits"][done], self.top_k)
                top_probabilities[finished], top_labels[finished] = probs, classes
            if step == steps or done.all():
                break
            if done.any():  # the exited images leave the batch
                keep = ~done
                running, images = running[keep], np.ascontiguousarray(images[keep])
                state = model.select(outputs, keep)
            else:
                state = {name: outputs[f"next_{name}"] for name in model.state_axis}
        return ExitBatch(labels=labels, confidences=confidences, exit_steps=exit_steps,
                         macs=model.step_macs[exit_steps - 1], boxes=boxes,
                         top_probabilities=top_probabilities, top_labels=top_labels)

    def predict(self, images: np.ndarray) -> list[Prediction]:
        """Early-exit inference on preprocessed images, one Prediction per image."""
        batch = self.run(images)
        names = self.model.class_names
        answers = []
        for i in range(len(batch.labels)):
            label, step = int(batch.labels[i]), int(batch.exit_steps[i])
            answers.append(Prediction(
                label=label, class_name=_name(names, label),
                confidence=float(batch.confidences[i]), exit_step=step,
                macs=int(batch.macs[i]), boxes=batch.boxes[i, :step].tolist(),
                top_k=[{"label": int(c), "class_name": _name(names, int(c)),
                        "probability": float(p)}
                       for p, c in zip(batch.top_probabilities[i], batch.top_labels[i])]))
        return answers

    def predict_images(self, images: Sequence[ImageInput]) -> list[Prediction]:
        """Files or PIL images -> predictions (preprocessed as the model was exported)."""
        transform = self.model.transform()
        return self.predict(np.stack([transform(image) for image in images]))


def _name(names, label: int) -> Optional[str]:
    return names[label] if names and label < len(names) else None


def _top_classes(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest float32 softmax probabilities and their classes, best first."""
    probabilities = exit_rule.softmax(logits)
    # a stable sort of the negated values: equal probabilities keep the lower class first
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(probabilities, order, axis=-1).astype(np.float32), order

