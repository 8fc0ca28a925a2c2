"""The near-tie comparison of engine_parity: it excuses only decisions next to a boundary and
still fails on a real difference."""
import numpy as np
import pytest
from engine_parity import (
    CONFIDENCE_TOLERANCE,
    LOGIT_TOLERANCE,
    allowed_near_ties,
    assert_same_answers,
    crop_near_ties,
    near_ties,
    reference_exit_steps,
)

from glancefocus.runtime import exit_rule


def logits_with_confidence(confidence, classes=4):
    """[K] logits whose softmax has max `confidence` at class 0 and the rest equal."""
    rest = (1 - confidence) / (classes - 1)
    return np.log(np.array([confidence] + [rest] * (classes - 1), dtype=np.float64))


def test_a_confidence_next_to_a_threshold_is_a_near_tie():
    thresholds = [0.5, 0.5, -1e8]
    rows = [0.5 + CONFIDENCE_TOLERANCE / 4, 0.5 - CONFIDENCE_TOLERANCE / 4, 0.6, 0.4]
    step1 = np.stack([logits_with_confidence(c) for c in rows])
    later = np.stack([logits_with_confidence(0.3)] * 4)
    logits = np.stack([step1, later, later]).astype(np.float32)
    assert reference_exit_steps(logits, thresholds).tolist() == [1, 3, 1, 3]
    assert near_ties(logits, None, thresholds).tolist() == [True, True, False, False]


def test_a_label_tie_counts_at_the_exit_step_only():
    tie = np.array([1.0, 1.0 + LOGIT_TOLERANCE, -2.0, -3.0], dtype=np.float32)
    clear = np.array([2.0, 1.0, -2.0, -3.0], dtype=np.float32)
    logits = np.stack([np.stack([tie, clear]), np.stack([clear, tie])])  # [T=2, N=2, K]
    # no exit before the last step: only the last step's labels matter
    assert near_ties(logits, None, [1e8, -1e8]).tolist() == [False, True]
    # top 3: the third and fourth classes of `clear` are 1.0 apart, not a tie
    assert near_ties(logits[:, 1:], None, [1e8, -1e8], top_k=3).tolist() == [True]


def test_a_crop_corner_next_to_a_pixel_boundary_is_a_near_tie():
    span = (68, 68)
    locations = np.array([[10 / 68 + 1e-8, 0.3], [0.3, 20 / 68], [0.31, 0.3]])
    assert crop_near_ties(locations, span).tolist() == [True, True, False]


@pytest.mark.parametrize("sign", [1, -1])
def test_a_perturbed_engine_differs_only_on_near_ties(sign):
    """A second 'engine' whose logits differ by just under LOGIT_TOLERANCE, in the direction that
    moves decisions most (the best class up and the runner-up down, or the reverse), changes
    exits and labels of some images, all of them flagged as near-ties."""
    n = 20000
    logits = np.random.default_rng(0).normal(0, 1, (3, n, 10)).astype(np.float32)
    thresholds = [float(np.median(exit_rule.softmax(logits[0]).max(-1))), 0.3, -1e8]
    order = np.argsort(logits, axis=-1)
    other = logits.astype(np.float64)
    shift = 0.99 * LOGIT_TOLERANCE
    np.put_along_axis(other, order[..., -1:], np.take_along_axis(other, order[..., -1:], -1)
                      + sign * shift, -1)
    np.put_along_axis(other, order[..., -2:-1], np.take_along_axis(other, order[..., -2:-1], -1)
                      - sign * shift, -1)
    near = near_ties(logits, None, thresholds)
    steps_a, steps_b = reference_exit_steps(logits, thresholds), reference_exit_steps(other, thresholds)
    labels_a = logits[steps_a - 1, np.arange(n)].argmax(-1)
    labels_b = other[steps_b - 1, np.arange(n)].argmax(-1)
    differ = (steps_a != steps_b) | (labels_a != labels_b)
    assert differ.any()
    assert not (differ & ~near).any()
    assert near.sum() <= allowed_near_ties(n)


def test_assert_same_answers_excuses_near_ties_and_nothing_else():
    want = {"labels": np.array([1, 2, 3, 4]), "boxes": np.zeros((4, 2, 4))}
    got = {"labels": np.array([1, 2, 0, 4]), "boxes": np.zeros((4, 2, 4))}
    assert_same_answers(want, got, np.array([False, False, True, False]))
    with pytest.raises(AssertionError, match="labels differs on 1 image.*image 2"):
        assert_same_answers(want, got, np.array([True, False, False, False]))
    got["boxes"][0, 1, 2] = 1
    with pytest.raises(AssertionError, match="boxes differs"):
        assert_same_answers(want, got, np.array([False, False, True, False]))
    with pytest.raises(AssertionError, match="2 of 4 images sit next to a decision boundary"):
        assert_same_answers(want, want, np.array([True, True, False, False]))
