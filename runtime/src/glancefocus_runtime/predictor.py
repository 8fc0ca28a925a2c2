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
from .pool import ExitPool, Finished
from .providers import check_session_providers, session_providers

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

    threads: onnxruntime's intra-op threads (default: its own choice). providers: onnxruntime's
    execution providers in order of preference ('cuda', 'CUDAExecutionProvider', ...; default
    CPU); one that is not available here is left out with a warning, and CPU is always last.
    """

    def __init__(self, folder: Union[str, Path], threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
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
        self.providers = session_providers(ort, providers)
        sessions = {}
        for entry in self.manifest["steps"]:
            name = entry["graph"]
            if name not in sessions:
                sessions[name] = ort.InferenceSession(str(self.folder / name), options,
                                                      providers=self.providers)
        self.providers = check_session_providers(next(iter(sessions.values())), self.providers)
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
                 top_k: int = 1, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
        if thresholds is not None and budget is not None:
            raise ValueError("give a MACs budget or explicit thresholds, not both")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model = (model if isinstance(model, ExportedModel)
                      else ExportedModel(model, threads, providers))
        self.top_k = min(int(top_k), self.model.num_classes)
        self.budget_index = None
        if budget is not None:
            self.budget_index = self._budget_index(budget)
            thresholds = self.model.exit_curve["thresholds"][self.budget_index]
        if thresholds is None:
            thresholds = exit_rule.never_exit_thresholds(self.model.max_steps)
        self.thresholds = exit_rule.as_thresholds(thresholds, self.model.max_steps)

    def _budget_index(self, budget: float) -> int:
        curve = self.model.exit_curve
        if not exit_rule.has_curve(curve):
            raise exit_rule.BudgetOutOfRangeError(
                f"cannot run at a budget of {budget:.6g} MACs: {NO_CURVE_HINT}")
        return exit_rule.budget_index(curve, float(budget))

    def thresholds_for_budget(self, budget: Optional[float]) -> np.ndarray:
        """[T] thresholds at a MACs budget (None: this predictor's own), by the exit rule."""
        if budget is None:
            return self.thresholds
        thresholds = self.model.exit_curve["thresholds"][self._budget_index(budget)]
        return exit_rule.as_thresholds(thresholds, self.model.max_steps)

    def run(self, images: np.ndarray, thresholds: Optional[np.ndarray] = None) -> ExitBatch:
        """Early-exit inference on preprocessed images [N, C, H, W]; thresholds: [N, T], one
        row per image (default: the predictor's for all)."""
        model = self.model
        images = model.check_images(images)
        steps, n = model.max_steps, images.shape[0]
        if thresholds is None:
            thresholds = self.thresholds
        elif np.shape(thresholds) != (n, steps):
            raise ValueError(f"thresholds must be [{n}, {steps}] (one row per image), got "
                             f"{list(np.shape(thresholds))}")
        pool = ExitPool(model)
        pool.add(images, thresholds, range(n))
        finished = []
        while len(pool):
            finished += pool.advance()
        return self.gather(finished, n)

    def gather(self, finished: Sequence[Finished], n: int) -> ExitBatch:
        """ExitPool's answers for images tagged 0..n-1, as arrays in that order."""
        steps = self.model.max_steps
        batch = ExitBatch(labels=np.zeros(n, dtype=np.int64),
                          confidences=np.zeros(n, dtype=np.float32),
                          exit_steps=np.zeros(n, dtype=np.int64), macs=np.zeros(n, dtype=np.int64),
                          boxes=np.full((n, steps, 4), -1, dtype=np.int64),
                          top_probabilities=np.zeros((n, self.top_k), dtype=np.float32),
                          top_labels=np.zeros((n, self.top_k), dtype=np.int64))
        for answer in finished:
            i = answer.tag
            batch.labels[i], batch.confidences[i] = answer.label, answer.confidence
            batch.exit_steps[i], batch.macs[i] = answer.exit_step, answer.macs
            batch.boxes[i, :answer.exit_step] = answer.boxes
            batch.top_probabilities[i], batch.top_labels[i] = top_classes(answer.probabilities,
                                                                          self.top_k)
        return batch

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


def top_classes(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest probabilities [..., K] and their classes, best first (equal ones keep the
    lower class first)."""
    if k == 1 and probabilities.ndim == 1:  # the server's usual question, at a third the cost
        best = int(probabilities.argmax())  # the first of equal ones, as the stable sort's
        return probabilities[best:best + 1].astype(np.float32), np.array([best])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(probabilities, order, axis=-1).astype(np.float32), order
