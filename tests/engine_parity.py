"""Comparing the answers of two engines (PyTorch and onnxruntime), precisions or kernels (a
batch of 200 against batches of fewer images) without depending on the last bits of a float.

Two float32 engines agree on logits only up to rounding, which differs between CPUs (AVX2,
AVX-512, AMX) and batch sizes. A decision taken on a float can therefore flip where the value sits
next to its boundary: an exit whose confidence is next to the step's threshold (seen on an
AVX-512/AMX Xeon: image 59 of 200 left at step 1 on onnxruntime and at step 3 on PyTorch), an
argmax whose two best classes nearly tie, a crop corner floor(location * span) whose argument is
next to an integer. `near_ties` finds the images that have such a decision on a reference run;
`assert_same_answers` requires exact agreement on every other image and that the near-ties stay
rare, so a real difference between the engines still fails the test.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from glancefocus import create_model
from glancefocus.runtime import exit_rule

LOGIT_TOLERANCE = 1e-4
"""How far two float32 engines' logits may differ (PyTorch against onnxruntime, measured: up to
4.8e-5 on the trained demo, whose logits reach ~16; under 1e-7 on the tests' untrained models)."""
CONFIDENCE_TOLERANCE = LOGIT_TOLERANCE / 2
"""A softmax probability moves by at most half the largest change of the logits."""
LOCATION_TOLERANCE = 1e-5
"""How far two engines' focus locations (in [0, 1]) may differ."""
NEAR_TIE_SHARE = 0.02
"""At most this share of the images (or one image) may hold a near-tie: with more, too little
would be compared; on the tests' models and images there are none or a few in a thousand."""


def spread_demo(seed: int = 0, num_classes: int = 10):
    """An untrained demo GFNet whose confidences spread over a wide range and whose labels vary.

    A freshly initialised encoder gives nearly the same features for every image (its logits
    differ by about 1e-5 between random canvases), so every confidence would sit within rounding
    of every calibrated threshold; amplifying the classifier's input and output weights spreads
    them as a trained model's are spread.
    """
    torch.manual_seed(seed)
    model = create_model("demo", num_classes=num_classes).eval()
    with torch.no_grad():
        model.classifier.fc.weight.normal_(0, 3)
        model.classifier.fc.bias.zero_()
        model.classifier.rnn.weight_ih_l0.mul_(30)
    model.class_names = [f"class{k}" for k in range(num_classes)]
    return model


def varied_images(n: int, seed: int, side: int = 48) -> torch.Tensor:
    """n one-channel noise images of random brightness and contrast: spread_demo's outputs vary
    with them (plain noise canvases all look alike to it)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, side, side, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 3
            + torch.randn(n, 1, 1, 1, generator=g))


def torch_steps(model, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Every image through every step in PyTorch: logits [T, N, K] and focus locations
    [T - 1, N, 2] (float32 numpy)."""
    with torch.inference_mode():
        out = model(images)
    return out.logits.float().numpy(), out.locations.float().numpy()


def onnx_steps(exported, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every image through every step of an ExportedModel: logits [T, N, K], locations
    [T - 1, N, 2]."""
    logits, locations, state = [], [], None
    for step in range(1, exported.max_steps + 1):
        outputs = exported.step(step, np.ascontiguousarray(images, dtype=np.float32), state)
        logits.append(outputs["logits"])
        if step > 1:
            locations.append(outputs["location"])
        state = {name: outputs[f"next_{name}"] for name in exported.state_axis}
    return np.stack(logits), np.stack(locations)


def reference_exit_steps(logits: np.ndarray, thresholds: Iterable[float]) -> np.ndarray:
    """1-based exit step of every image under the exit rule (exit_rule.exits_now)."""
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    steps, n = logits.shape[:2]
    exit_steps = np.zeros(n, dtype=np.int64)
    for step in range(1, steps + 1):
        confidences, _ = exit_rule.softmax_confidences(logits[step - 1])
        done = exit_rule.exits_now(confidences, thresholds[step - 1], step == steps)
        exit_steps[(exit_steps == 0) & done] = step
    return exit_steps


def near_ties(logits: np.ndarray, locations: Optional[np.ndarray], thresholds: Iterable[float],
              crop_span: Optional[tuple[int, int]] = None, top_k: int = 1) -> np.ndarray:
    """[N] bool: images with a decision that engines agreeing within the tolerances above could
    take differently, on a reference run (logits [T, N, K], locations [T - 1, N, 2]).

    Up to the image's reference exit step: a confidence within CONFIDENCE_TOLERANCE of its
    step's threshold; a location whose crop corner floor(location * span) is within
    LOCATION_TOLERANCE * span of a pixel boundary (crop_span: (height - P, width - P); None: the
    boxes are not compared). At the exit step: two of the top_k + 1 largest logits within
    2 * LOGIT_TOLERANCE of each other (the label or the order of the top_k classes could swap).
    """
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    steps, n = logits.shape[:2]
    exit_steps = reference_exit_steps(logits, thresholds)
    near = np.zeros(n, dtype=bool)
    for step in range(1, steps + 1):
        reached = exit_steps >= step
        if step < steps:
            confidences, _ = exit_rule.softmax_confidences(logits[step - 1])
            gap = np.abs(confidences.astype(np.float64) - thresholds[step - 1])
            near |= reached & (gap <= CONFIDENCE_TOLERANCE)
        if step > 1 and locations is not None and crop_span is not None:
            near |= reached & crop_near_ties(locations[step - 2], crop_span)
        best = -np.sort(-logits[step - 1].astype(np.float64), axis=-1)[:, :top_k + 1]
        label_tie = (np.diff(-best, axis=-1) <= 2 * LOGIT_TOLERANCE).any(-1)
        near |= (exit_steps == step) & label_tie
    return near


def crop_near_ties(locations: np.ndarray, crop_span: tuple[int, int]) -> np.ndarray:
    """[N] bool: focus locations [N, 2] whose crop corner floor(location * span) (crops.py) two
    engines agreeing within LOCATION_TOLERANCE could put one pixel apart."""
    span = np.asarray(crop_span, dtype=np.float64)
    corner = np.asarray(locations, dtype=np.float64) * span
    return (np.abs(corner - np.round(corner)) <= LOCATION_TOLERANCE * span).any(-1)


def allowed_near_ties(n: int) -> int:
    """How many of n images may hold a near-tie: NEAR_TIE_SHARE of them, at least one."""
    return max(1, int(NEAR_TIE_SHARE * n))


def assert_same_answers(want: dict, got: dict, near: np.ndarray, what: str = "") -> None:
    """The two engines' answers (name -> [N, ...] array: labels, exit_steps, boxes, ...) are
    equal on every image that is not a near-tie, and near-ties are rare (allowed_near_ties)."""
    near = np.asarray(near, dtype=bool)
    assert near.sum() <= allowed_near_ties(near.size), (
        f"{what}: {int(near.sum())} of {near.size} images sit next to a decision boundary: "
        "too many to call the comparison meaningful (are the confidences spread?)")
    clear = ~near
    for name in want:
        a, b = np.asarray(want[name])[clear], np.asarray(got[name])[clear]
        differ = np.flatnonzero((a != b).reshape(len(a), -1).any(-1))
        assert differ.size == 0, (
            f"{what}: {name} differs on {differ.size} image(s) clear of every near-tie, e.g. "
            f"image {np.flatnonzero(clear)[differ[0]]}: {a[differ[0]].tolist()} against "
            f"{b[differ[0]].tolist()}")
