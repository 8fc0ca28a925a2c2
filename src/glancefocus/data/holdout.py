"""The held-out share of a training set (data.holdout_fraction): the same items at every call,
chosen by data.seed, so that training leaves out exactly what calibration later uses."""
from __future__ import annotations

import torch

HOLDOUT_STREAM = 7


def held_out(count: int, fraction: float, seed: int) -> torch.Tensor:
    """A bool mask [count]: True for the held-out items (at least one when fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.holdout_fraction must be in [0, 1), got {fraction}")
    mask = torch.zeros(count, dtype=torch.bool)
    if fraction > 0 and count:
        chosen = torch.randperm(count, generator=torch.Generator().manual_seed(
            seed * 1000 + HOLDOUT_STREAM))[:max(1, round(fraction * count))]
        mask[chosen] = True
    return mask


PARTS = ("all", "train", "holdout")
"""Which items of a training split a dataset holds: all, those trained on, or the held-out."""


def select_part(items: list, part: str, fraction: float, seed: int) -> list:
    """The items of `part` (see PARTS)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "all" or fraction == 0:
        if part == "holdout":
            raise ValueError("no images are held out: train with data.holdout_fraction > 0 "
                             "(e.g. 0.1) to calibrate on held-out images")
        return items
    mask = held_out(len(items), fraction, seed).tolist()
    return [item for item, out in zip(items, mask) if out == (part == "holdout")]
