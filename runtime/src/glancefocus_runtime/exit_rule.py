"""The early-exit rule in plain Python and numpy, shared by the PyTorch code (exits.py,
predictor.py) and the ONNX runtime, so the two cannot pick different thresholds or exits.

- A MACs budget picks the calibrated budget with the largest expected MACs not above it
  (`budget_index`): below the curve it is an error, above it a warning.
- An image exits at the first step whose max softmax probability (a float32 softmax, compared in
  float64) is >= that step's threshold, and at the last step in any case (`exits_now`).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

BIG = 1e8
"""The 'never exit' threshold (and its negative, 'always exit' at the last step), as the authors."""


class BudgetOutOfRangeError(ValueError):
    """A MACs budget below the cheapest calibrated budget: no thresholds can keep to it."""


class BudgetAboveCurveWarning(UserWarning):
    """A MACs budget above the most expensive calibrated budget: its end is used instead."""


def curve_range(curve: dict) -> str:
    """'A to B MACs per image', the span of a calibrated curve, for messages."""
    return f"{min(curve['macs']):.6g} to {max(curve['macs']):.6g} MACs per image"


def budget_index(curve: dict, macs_budget: float) -> int:
    """Index of the calibrated budget with the largest expected MACs not above macs_budget.

    Equal MACs are broken by the higher accuracy. Below the curve's cheapest budget this raises
    BudgetOutOfRangeError (a silent fallback would overspend); above its most expensive one it
    warns (BudgetAboveCurveWarning) and uses that one, since the curve cannot say more.
    """
    macs = curve["macs"]
    if not macs_budget > 0:
        raise BudgetOutOfRangeError(f"the MACs budget must be > 0, got {macs_budget:.6g}")
    fitting = [i for i, m in enumerate(macs) if m <= macs_budget]
    if not fitting:
        raise BudgetOutOfRangeError(
            f"no budget fits {macs_budget:.6g} MACs per image: the calibrated curve spans "
            f"{curve_range(curve)} (the smallest available is {min(macs):.6g})")
    best = max(fitting, key=lambda i: (macs[i], curve["accuracy"][i]))
    if macs_budget > max(macs):
        warnings.warn(
            f"the budget of {macs_budget:.6g} MACs per image is above the calibrated curve "
            f"({curve_range(curve)}): using its most expensive budget, {macs[best]:.6g} MACs; "
            "give no budget to run every step for every image", BudgetAboveCurveWarning,
            stacklevel=3)
    return best


def has_curve(curve: Optional[dict]) -> bool:
    """Whether `curve` holds calibrated thresholds and MACs per budget."""
    return bool(curve) and bool(curve.get("thresholds")) and bool(curve.get("macs"))


def never_exit_thresholds(steps: int) -> list[float]:
    """Thresholds that run every step for every image."""
    return [BIG] * (steps - 1) + [-BIG]


def softmax_confidences(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max softmax probability (float32 softmax, as the PyTorch path) and argmax of [N, K]
    logits: (confidence [N] float32, label [N] int64)."""
    probabilities = softmax(logits)
    labels = probabilities.argmax(axis=-1)
    return np.take_along_axis(probabilities, labels[:, None], axis=-1)[:, 0], labels.astype(np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32 (at least)."""
    logits = np.asarray(logits, dtype=np.promote_types(np.asarray(logits).dtype, np.float32))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def exits_now(confidences: np.ndarray, threshold, last_step) -> np.ndarray:
    """Which images exit at this step: confidence >= threshold in float64; all at the last.

    threshold and last_step are one value for all images or one per image (images at different
    steps, or with different budgets, share a batch in the server)."""
    confidences = np.asarray(confidences, dtype=np.float64)
    exits = confidences >= np.asarray(threshold, dtype=np.float64)
    return np.broadcast_to(exits | np.asarray(last_step, dtype=bool), confidences.shape).copy()


def as_thresholds(values: Sequence[float], steps: int) -> np.ndarray:
    """[T] float64 thresholds, checked against the number of steps."""
    thresholds = np.asarray(values, dtype=np.float64).reshape(-1)
    if thresholds.size != steps:
        raise ValueError(f"need {steps} thresholds (one per step), got {thresholds.size}")
    return thresholds
