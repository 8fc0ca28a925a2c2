"""Early exits: confidence thresholds for budgeted batch classification (the authors' protocol).

Every step is run for every sample; exits are simulated afterwards from the per-step confidences
(max softmax probability). Thresholds for 39 budgets are calibrated with the authors' walk, then
applied to another set to trace accuracy against expected MACs per image.

All functions are pure and work on CPU tensors. Confidences are compared in float64: a float32
confidence converts exactly, so a threshold taken from one compares equal to it.

Precision of n_k = floor(N * share_k): exactly as the authors' code behaves, the shares are
float32 (exp(log(q) * k) on a FloatTensor, normalised by their float32 sum) and N * share_k is a
float32 product. This can differ from exact arithmetic by one sample: for N = 200,000, T = 5,
q = 29/20 the authors' (and our) n_4 is 50,719 where the exact value is 50,718.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

# the 'never exit' threshold and the budget rule live in a torch-free module that the ONNX
# runtime shares (re-exported here)
from glancefocus_runtime.exit_rule import (  # noqa: F401
    BIG,
    BudgetAboveCurveWarning,
    BudgetOutOfRangeError,
    budget_index,
    curve_range,
)

TensorLike = Union[torch.Tensor, Sequence[float]]


def budget_ratios() -> list[float]:
    """The 39 budget parameters q = p / 20, p = 1..39 (small q: most samples exit early)."""
    return [p / 20 for p in range(1, 40)]


def target_shares(q: float, steps: int) -> torch.Tensor:
    """Target share exiting at step k = 1..steps, proportional to q ** k, summing to 1.

    float32, computed as the authors' code does (see the module docstring).
    """
    if q <= 0 or steps < 1:
        raise ValueError(f"need q > 0 and steps >= 1, got q={q}, steps={steps}")
    q32 = torch.tensor([q], dtype=torch.float32)
    weights = torch.exp(torch.log(q32) * torch.arange(1, steps + 1, dtype=torch.float32))
    return weights / weights.sum()


def confidences_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step max softmax probability and argmax: logits [T, N, K] -> (conf [T, N], pred [T, N])."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [T, N, K], got shape {tuple(logits.shape)}")
    # bf16/fp16 softmax would round confidences coarsely and create ties: use float32 at least.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.detach().to(dtype), dim=-1)
    conf, pred = probs.max(dim=-1)
    return conf, pred


def _as_conf(conf: TensorLike) -> torch.Tensor:
    conf = torch.as_tensor(conf).detach().to("cpu", torch.float64)
    if conf.dim() != 2:
        raise ValueError(f"confidences must be [T, N], got shape {tuple(conf.shape)}")
    return conf


def calibrate_thresholds(conf: TensorLike, shares: TensorLike) -> torch.Tensor:
    """Thresholds [T] (float64) from confidences [T, N], with the authors' walk.

    For k < T: n_k = floor(N * share_k); the threshold is the n_k-th largest step-k confidence among
    samples not yet marked (+1e8 if n_k is 0 or fewer than n_k remain); then every sample whose
    step-k confidence >= threshold is marked. Ties can therefore exit beyond the share, and the
    ties' surplus is missing from later steps. The last threshold is -1e8.
    """
    conf = _as_conf(conf)
    shares = torch.as_tensor(shares)
    steps, n = conf.shape
    if shares.shape != (steps,):
        raise ValueError(f"shares must have {steps} entries, got shape {tuple(shares.shape)}")
    thresholds = torch.full((steps,), BIG, dtype=torch.float64)
    marked = torch.zeros(n, dtype=torch.bool)
    for k in range(steps - 1):
        # the product in the shares' own precision (float32 for target_shares), as the authors
        n_k = math.floor(float(n * shares[k]))
        unmarked = conf[k][~marked]
        if 0 < n_k <= unmarked.numel():
            # The walk's n_k-th counted sample has the n_k-th largest unmarked confidence,
            # whatever order ties were sorted in.
            thresholds[k] = torch.kthvalue(unmarked, unmarked.numel() - n_k + 1).values
        marked |= conf[k] >= thresholds[k]
    thresholds[-1] = -BIG
    return thresholds


def calibrate_budgets(conf: TensorLike) -> torch.Tensor:
    """Thresholds [39, T] for the budgets q = p / 20, p = 1..39."""
    conf = _as_conf(conf)
    steps = conf.shape[0]
    return torch.stack([calibrate_thresholds(conf, target_shares(q, steps)) for q in budget_ratios()])


def exit_steps(conf: TensorLike, thresholds: TensorLike) -> torch.Tensor:
    """0-based exit step [N]: the first step whose confidence >= its threshold.

    A sample that meets no threshold (only possible if the last one is not -1e8, or with NaN
    confidences) exits at the last step, where the full network would have stopped anyway.
    """
    conf = _as_conf(conf)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).to("cpu")
    if thresholds.shape != (conf.shape[0],):
        raise ValueError(f"thresholds must have {conf.shape[0]} entries, got {tuple(thresholds.shape)}")
    hits = conf >= thresholds[:, None]
    # Number of steps before the first hit = the index of the first hit.
    leading_misses = (hits.long().cumsum(dim=0) == 0).sum(dim=0)
    return leading_misses.clamp(max=conf.shape[0] - 1)


def simulate_exits(
    conf: TensorLike,
    pred: torch.Tensor,
    labels: torch.Tensor,
    thresholds: TensorLike,
    step_macs: TensorLike,
) -> dict:
    """Simulate early exits on a set whose every step was run.

    step_macs[k] = cumulative MACs of running k + 1 steps. Returns 'exit_step' [N] (0-based),
    'pred' [N] (the prediction at exit), 'accuracy' (percent), 'exit_share' [T] (float64) and
    'macs' (expected MACs per image = sum_k exit_share[k] * step_macs[k]).
    """
    steps = exit_steps(conf, thresholds)
    pred = torch.as_tensor(pred).to("cpu", torch.long)
    labels = torch.as_tensor(labels).to("cpu", torch.long)
    step_macs = torch.as_tensor(step_macs, dtype=torch.float64).to("cpu")
    n_steps, n = pred.shape
    if step_macs.shape != (n_steps,) or labels.shape != (n,):
        raise ValueError("step_macs must be [T] and labels [N] for pred [T, N]")
    pred_at_exit = pred.gather(0, steps[None]).squeeze(0)
    correct = int((pred_at_exit == labels).sum())
    share = torch.bincount(steps, minlength=n_steps).double() / n
    return {
        "exit_step": steps,
        "pred": pred_at_exit,
        "accuracy": correct * 100.0 / n,
        "exit_share": share,
        "macs": float((share * step_macs).sum()),
    }


def anytime_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (percent) after each step: {'top1': [T floats], 'top5': [...]}.

    k is clipped to the number of classes (the key keeps the requested k).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [T, N, K], got shape {tuple(logits.shape)}")
    logits = logits.detach().to("cpu", torch.promote_types(logits.dtype, torch.float32))
    labels = torch.as_tensor(labels).to("cpu", torch.long)
    n_classes, n = logits.shape[2], logits.shape[1]
    result = {}
    for k in topk:
        top = logits.topk(min(k, n_classes), dim=-1).indices  # [T, N, k]
        correct = (top == labels[None, :, None]).any(dim=-1).sum(dim=1)  # [T]
        result[f"top{k}"] = [int(c) * 100.0 / n for c in correct]
    return result


def budgeted_curve(
    calib_conf: TensorLike,
    val_conf: TensorLike,
    val_pred: torch.Tensor,
    val_labels: torch.Tensor,
    step_macs: TensorLike,
) -> dict:
    """Thresholds calibrated on one set for the 39 budgets, evaluated on another.

    Returns plain lists (safe to store in a checkpoint): 'budgets' (39 q values), 'thresholds'
    (39 x T), 'macs' (39, expected MACs per image on the val set), 'accuracy' (39, percent).
    """
    thresholds = calibrate_budgets(calib_conf)
    macs, accuracy = [], []
    for thr in thresholds:
        sim = simulate_exits(val_conf, val_pred, val_labels, thr, step_macs)
        macs.append(sim["macs"])
        accuracy.append(sim["accuracy"])
    return {
        "budgets": budget_ratios(),
        "thresholds": thresholds.tolist(),
        "macs": macs,
        "accuracy": accuracy,
    }


def thresholds_for_budget(curve: dict, macs_budget: float) -> torch.Tensor:
    """Thresholds [T] of the calibrated budget chosen by `budget_index` (see there)."""
    return torch.tensor(curve["thresholds"][budget_index(curve, macs_budget)], dtype=torch.float64)
