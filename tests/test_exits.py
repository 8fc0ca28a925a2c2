"""Tests of the early-exit simulation and the authors' threshold calibration (their budgeted
batch classification protocol)."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from glancefocus.exits import (
    BudgetAboveCurveWarning,
    BudgetOutOfRangeError,
    anytime_accuracy,
    budget_index,
    budget_ratios,
    budgeted_curve,
    calibrate_budgets,
    calibrate_thresholds,
    confidences_from_logits,
    exit_steps,
    simulate_exits,
    target_shares,
    thresholds_for_budget,
)

BIG = 1e8


# ---------------------------------------------------------------- slow, obviously-correct references


def reference_calibration(conf_rows, shares):
    """Literal transcription of the authors' calibration walk, one sample at a time.

    shares: a float32 tensor, and n_k = floor(N * share_k) is a float32 product, as in their code
    (in float64, N = 31, q = 0.55 gives 19.99... where float32 gives 20)."""
    steps, n = len(conf_rows), len(conf_rows[0])
    thresholds = [BIG] * steps
    marked = [False] * n
    for k in range(steps - 1):
        n_k = math.floor(float(n * shares[k]))
        order = sorted(range(n), key=lambda i: conf_rows[k][i], reverse=True)
        count = 0
        for i in order:
            if not marked[i]:
                count += 1
                if count == n_k:
                    thresholds[k] = conf_rows[k][i]
                    break
        for i in range(n):
            if conf_rows[k][i] >= thresholds[k]:
                marked[i] = True
    thresholds[-1] = -BIG
    return thresholds


def reference_exit_steps(conf_rows, thresholds):
    steps, n = len(conf_rows), len(conf_rows[0])
    out = []
    for i in range(n):
        for k in range(steps):
            if conf_rows[k][i] >= thresholds[k]:
                out.append(k)
                break
    return out


def n_exits(n, shares):
    """floor(N * share_k) for k < T, in the shares' own (float32) precision, as the authors."""
    return [math.floor(float(n * s)) for s in shares[:-1]]


def exit_counts(conf, thresholds):
    return torch.bincount(exit_steps(conf, thresholds), minlength=conf.shape[0]).tolist()


# ---------------------------------------------------------------- strategies


@st.composite
def conf_matrices(draw, kind):
    """Confidences [T, N] as float32 (like softmax outputs).

    kind 'distinct': distinct values within each step; 'ties': a few values only; 'any': floats.
    """
    steps = draw(st.integers(2, 5))
    n = draw(st.integers(1, 40))
    rows = []
    for _ in range(steps):
        if kind == "distinct":
            perm = draw(st.permutations(range(n)))
            rows.append([(v + 1) / (n + 1) for v in perm])
        elif kind == "ties":
            rows.append(draw(st.lists(st.sampled_from([0.2, 0.5, 0.7, 1.0]), min_size=n, max_size=n)))
        else:
            rows.append(draw(st.lists(st.floats(0, 1, width=32), min_size=n, max_size=n)))
    return torch.tensor(rows, dtype=torch.float32)


budgets = st.sampled_from(budget_ratios())


# ---------------------------------------------------------------- shares and budgets


def test_budget_ratios():
    q = budget_ratios()
    assert len(q) == 39 and q[0] == 0.05 and q[19] == 1.0 and q[-1] == 1.95


def test_target_shares():
    assert target_shares(1.0, 4).tolist() == [0.25] * 4
    s = target_shares(0.5, 3)  # 0.5, 0.25, 0.125 over 0.875
    assert s.dtype == torch.float32  # the authors' arithmetic
    assert torch.allclose(s, torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    s = target_shares(1.95, 5)
    assert abs(float(s.sum()) - 1) < 1e-6 and bool((s[1:] > s[:-1]).all())


def test_share_counts_follow_the_authors_float32_arithmetic():
    # N = 200,000 (the authors' calibration size), T = 5, q = 29/20: the float32 product gives
    # n_4 = 50,719 where exact arithmetic gives 50,718
    shares = target_shares(29 / 20, 5)
    assert math.floor(float(200_000 * shares[3])) == 50_719
    exact = (29 / 20) ** 4 / sum((29 / 20) ** k for k in range(1, 6))
    assert math.floor(200_000 * exact) == 50_718


# ---------------------------------------------------------------- hand-worked calibrations


def test_t2_plain():
    # T=2, q=1: shares [0.5, 0.5], N=4 -> n_1 = 2. The 2nd largest step-1 confidence is 0.8.
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.1, 0.1, 0.1]])
    thr = calibrate_thresholds(conf, target_shares(1.0, 2))
    assert thr.tolist() == [conf[0, 1].item(), -BIG]
    assert exit_steps(conf, thr).tolist() == [0, 0, 1, 1]


def test_t2_ties_exit_beyond_share():
    # n_1 = 2; sorted step-1 confidences 0.9, 0.8, 0.8, 0.6 -> threshold 0.8, and both 0.8s exit:
    # 3 of 4 samples exit at step 1 although the share is 2.
    conf = torch.tensor([[0.9, 0.8, 0.8, 0.6], [0.1, 0.1, 0.1, 0.1]])
    thr = calibrate_thresholds(conf, target_shares(1.0, 2))
    assert thr[0].item() == conf[0, 1].item()
    assert exit_counts(conf, thr) == [3, 1]


def test_t2_n_k_zero():
    # q=1.95, T=2: share_1 = 1/2.95 = 0.339; N=2 -> n_1 = floor(0.678) = 0: nobody exits at step 1.
    shares = target_shares(1.95, 2)
    assert n_exits(2, shares) == [0]
    conf = torch.tensor([[1.0, 0.9], [0.2, 0.3]])
    thr = calibrate_thresholds(conf, shares)
    assert thr.tolist() == [BIG, -BIG]
    assert exit_steps(conf, thr).tolist() == [1, 1]


def test_t3_fewer_unmarked_than_n_k():
    # T=3, q=1: shares 1/3 each, N=6 -> n_1 = n_2 = 2.
    # Step 1: 0.9, 0.8, 0.8, 0.8, 0.8, 0.1 -> threshold 0.8 marks five samples (ties).
    # Step 2: one unmarked sample left, fewer than n_2 = 2 -> threshold stays 1e8.
    shares = target_shares(1.0, 3)
    assert n_exits(6, shares) == [2, 2]
    conf = torch.tensor([
        [0.9, 0.8, 0.8, 0.8, 0.8, 0.1],
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.9],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ])
    thr = calibrate_thresholds(conf, shares)
    assert thr.tolist() == [conf[0, 1].item(), BIG, -BIG]
    assert exit_steps(conf, thr).tolist() == [0, 0, 0, 0, 0, 2]


def test_t3_walk_skips_marked_and_marks_persist():
    # T=3, q=1, N=6 -> n_1 = n_2 = 2.
    # Step 1: threshold 0.8 (2nd largest), marks samples 0 and 1.
    # Step 2: the walk in descending order 0.99 (sample 0, marked: skipped), 0.7 (sample 2, count 1),
    #   0.6 (sample 3, count 2) -> threshold 0.6 (not 0.7, which it would be without skipping).
    #   Sample 1's step-2 confidence 0.2 is below 0.6, but it stays marked: it exited at step 1.
    conf = torch.tensor([
        [0.9, 0.8, 0.3, 0.2, 0.1, 0.05],
        [0.99, 0.2, 0.7, 0.6, 0.5, 0.4],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ])
    thr = calibrate_thresholds(conf, target_shares(1.0, 3))
    assert thr.tolist() == [conf[0, 1].item(), conf[1, 3].item(), -BIG]
    assert exit_steps(conf, thr).tolist() == [0, 0, 1, 1, 2, 2]


def test_simulate_exits_by_hand():
    # Thresholds of the previous test: exits [0, 0, 1, 1, 2, 2], two samples per step.
    conf = torch.tensor([
        [0.9, 0.8, 0.3, 0.2, 0.1, 0.05],
        [0.99, 0.2, 0.7, 0.6, 0.5, 0.4],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ])
    pred = torch.tensor([[1, 2, 0, 0, 0, 0], [0, 0, 3, 9, 0, 0], [0, 0, 0, 0, 5, 6]])
    labels = torch.tensor([1, 0, 3, 4, 5, 0])  # correct at exit: samples 0, 2, 4
    thr = calibrate_thresholds(conf, target_shares(1.0, 3))
    sim = simulate_exits(conf, pred, labels, thr, [10, 20, 30])
    assert sim["exit_step"].tolist() == [0, 0, 1, 1, 2, 2]
    assert sim["pred"].tolist() == [1, 2, 3, 9, 5, 6]
    assert sim["accuracy"] == 50.0
    assert torch.allclose(sim["exit_share"], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert sim["macs"] == pytest.approx(20.0)


def test_float32_confidence_equals_its_threshold():
    # A float32 confidence that is not a short decimal must still pass the threshold taken from it.
    conf = torch.rand(2, 101, generator=torch.Generator().manual_seed(0))
    thr = calibrate_thresholds(conf, target_shares(1.0, 2))
    assert exit_counts(conf, thr)[0] == 50


# ---------------------------------------------------------------- vectorised == literal walk


@settings(max_examples=200, deadline=None)
@given(conf=st.one_of(conf_matrices("ties"), conf_matrices("any"), conf_matrices("distinct")), q=budgets)
def test_calibration_matches_reference(conf, q):
    shares = target_shares(q, conf.shape[0])
    expected = reference_calibration(conf.double().tolist(), shares)
    got = calibrate_thresholds(conf, shares)
    assert got.tolist() == expected
    assert exit_steps(conf, got).tolist() == reference_exit_steps(conf.double().tolist(), expected)


@settings(max_examples=50, deadline=None)
@given(conf=conf_matrices("ties"))
def test_calibrate_budgets_stacks_the_39(conf):
    thr = calibrate_budgets(conf)
    assert thr.shape == (39, conf.shape[0])
    for i, q in enumerate(budget_ratios()):
        assert thr[i].tolist() == calibrate_thresholds(conf, target_shares(q, conf.shape[0])).tolist()


@settings(max_examples=200, deadline=None)
@given(conf=conf_matrices("any"), data=st.data())
def test_exit_steps_matches_loop(conf, data):
    # Arbitrary thresholds, last one -1e8 as always.
    steps = conf.shape[0]
    thr = data.draw(st.lists(st.floats(0, 1, width=32), min_size=steps - 1, max_size=steps - 1)) + [-BIG]
    assert exit_steps(conf, thr).tolist() == reference_exit_steps(conf.double().tolist(), thr)


# ---------------------------------------------------------------- properties of the walk


@settings(max_examples=200, deadline=None)
@given(conf=conf_matrices("distinct"), q=budgets)
# found by hypothesis on one CI-like run: N * share_k lands on an integer in float32 only
@example(conf=torch.arange(1, 20, dtype=torch.float32).div(20).repeat(3, 1), q=1.5)
def test_distinct_confidences_exit_exactly_n_k(conf, q):
    # With distinct confidences within each step, no tie overshoots, so before step k at most
    # sum_{j<k} n_j <= N (1 - share_k - ...) samples are marked and n_k unmarked always remain:
    # exactly n_k = floor(N share_k) exit at each step k < T, the floor remainders at step T.
    steps, n = conf.shape
    shares = target_shares(q, steps)
    thr = calibrate_thresholds(conf, shares)
    want = n_exits(n, shares)
    assert exit_counts(conf, thr) == want + [n - sum(want)]
    # Hence never more than the target share at a step k < T (nor cumulatively up to k), with
    # N * share_k in float32 as n_k is (19 * float32(6/19) is 6.0 there, 5.99999974 in float64)
    counts = exit_counts(conf, thr)
    for k in range(steps - 1):
        assert counts[k] <= float(n * shares[k])
        assert sum(counts[: k + 1]) <= float(n * shares[: k + 1].sum()) + 1e-3
    # A threshold stays 1e8 exactly when n_k is 0.
    for k in range(steps - 1):
        assert (thr[k].item() == BIG) == (want[k] == 0)


@settings(max_examples=200, deadline=None)
@given(conf=conf_matrices("ties"), q=budgets)
def test_ties_exit_at_least_n_k_or_nobody(conf, q):
    # With ties: at a step whose threshold is set, at least n_k samples exit (ties can add more);
    # otherwise nobody does (n_k was 0, or fewer than n_k samples were left).
    steps, n = conf.shape
    shares = target_shares(q, steps)
    thr = calibrate_thresholds(conf, shares)
    counts = exit_counts(conf, thr)
    for k, n_k in enumerate(n_exits(n, shares)):
        if thr[k].item() == BIG:
            assert counts[k] == 0
        else:
            assert counts[k] >= n_k > 0


# ---------------------------------------------------------------- more budget, more MACs?
#
# What holds, on the calibration set with distinct confidences: the exit counts are n_k =
# floor(N share_k) for k < T and the remainder at T. The target shares (exact) shift to later steps
# as q grows (the ratio share_k(q2) / share_k(q1) grows with k), so the target expected MACs never
# decrease. The floors only add MACs, by less than sum_{k<T} (M_T - M_k) / N. So the realised MACs
# are monotone up to that slack, and exactly monotone for T = 2 (one threshold that only rises
# with q, on any set, ties or not). They are NOT exactly monotone in general; see the two tests
# below the property tests.


def _calib_macs(conf, step_macs):
    steps = conf.shape[0]
    zeros = torch.zeros(steps, conf.shape[1], dtype=torch.long)
    return [
        simulate_exits(conf, zeros, zeros[0], thr, step_macs)["macs"] for thr in calibrate_budgets(conf)
    ]


@settings(max_examples=100, deadline=None)
@given(
    conf=conf_matrices("distinct"),
    increments=st.lists(st.floats(0, 1e9), min_size=5, max_size=5),
)
def test_more_budget_more_macs_up_to_floor_slack(conf, increments):
    steps, n = conf.shape
    step_macs = [sum(increments[: k + 1]) for k in range(steps)]  # cumulative: non-decreasing
    slack = sum(step_macs[-1] - m for m in step_macs[:-1]) / n
    macs = _calib_macs(conf, step_macs)
    for lo, hi in zip(macs, macs[1:]):
        assert hi >= lo - slack - 1e-6 * (1 + step_macs[-1])


@settings(max_examples=100, deadline=None)
@given(calib=conf_matrices("ties"), data=st.data())
def test_more_budget_more_macs_t2_any_set(calib, data):
    calib = calib[:2]
    n_val = data.draw(st.integers(1, 20))
    val = torch.tensor(data.draw(st.lists(st.sampled_from([0.2, 0.5, 0.7, 1.0]), min_size=2 * n_val,
                                          max_size=2 * n_val))).view(2, n_val)
    zeros = torch.zeros(2, n_val, dtype=torch.long)
    curve = budgeted_curve(calib, val, zeros, zeros[0], [1.0, 2.0])
    assert all(hi >= lo for lo, hi in zip(curve["macs"], curve["macs"][1:]))


def test_counterexample_floor_remainder_on_calibration_set():
    # T=3, N=3, distinct confidences. q=0.95: N shares = 1.05, 0.9997, 0.95 -> n = [1, 0], so two
    # samples fall to step 3. q=1.0: N shares = 1, 1, 1 -> n = [1, 1]. More budget, fewer MACs.
    conf = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    assert n_exits(3, target_shares(0.95, 3)) == [1, 0]
    assert n_exits(3, target_shares(1.0, 3)) == [1, 1]
    macs = _calib_macs(conf, [1.0, 2.0, 3.0])
    assert macs[18] == pytest.approx(7 / 3) and macs[19] == pytest.approx(2.0)


def test_counterexample_on_another_set():
    # Thresholds are not monotone in q: fewer samples marked at step 1 leave a different pool at
    # step 2. T=3, N=8, distinct calibration confidences.
    # q=0.10: n = [7, 0] -> thresholds [0.2, 1e8]; q=0.15: n = [6, 1] -> step-1 threshold 0.3
    # leaves samples 0 and 5 (step-2 conf 0.4, 0.2) -> thresholds [0.3, 0.4].
    # A val sample with confidences (0.15, 0.65, 0.15) exits at step 3 under q=0.10, at step 2
    # under q=0.15: its MACs drop although the calibration-set MACs rise.
    calib = torch.tensor([
        [0.2, 0.8, 0.4, 0.7, 0.3, 0.1, 0.6, 0.5],
        [0.4, 0.6, 0.5, 0.3, 0.7, 0.2, 0.8, 0.1],
        [0.7, 0.5, 0.2, 0.8, 0.1, 0.4, 0.3, 0.6],
    ])
    val = torch.tensor([[0.15], [0.65], [0.15]])
    thr = calibrate_budgets(calib)
    assert thr[1].tolist() == [calib[0, 0].item(), BIG, -BIG]
    assert thr[2].tolist() == [calib[0, 4].item(), calib[1, 0].item(), -BIG]
    calib_macs = _calib_macs(calib, [1.0, 2.0, 3.0])
    assert calib_macs[2] > calib_macs[1]
    zeros = torch.zeros(3, 1, dtype=torch.long)
    curve = budgeted_curve(calib, val, zeros, zeros[0], [1.0, 2.0, 3.0])
    assert curve["macs"][1] == 3.0 and curve["macs"][2] == 2.0


# ---------------------------------------------------------------- logits, accuracy, curve


def test_confidences_from_logits_bf16():
    logits = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(0))
    conf, pred = confidences_from_logits(logits.bfloat16())
    assert conf.dtype == torch.float32 and pred.shape == (3, 10)
    probs = torch.softmax(logits.bfloat16().float(), dim=-1)
    assert torch.equal(conf, probs.max(-1).values)
    assert torch.equal(pred, logits.bfloat16().float().argmax(-1))


@settings(max_examples=50, deadline=None)
@given(
    steps=st.integers(1, 4), n=st.integers(1, 30), classes=st.integers(1, 8), seed=st.integers(0, 2**31)
)
def test_anytime_accuracy_direct(steps, n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, n, classes, generator=g)  # distinct values: no ranking ties
    labels = torch.randint(0, classes, (n,), generator=g)
    acc = anytime_accuracy(logits, labels, topk=(1, 5))
    for t in range(steps):
        top1 = sum(int(logits[t, i].argmax()) == int(labels[i]) for i in range(n)) * 100.0 / n
        # rank of the true class = how many classes score higher; top-k if that is < k (k <= K).
        rank = [int((logits[t, i] > logits[t, i, labels[i]]).sum()) for i in range(n)]
        top5 = sum(r < min(5, classes) for r in rank) * 100.0 / n
        assert acc["top1"][t] == pytest.approx(top1)
        assert acc["top5"][t] == pytest.approx(top5)


def test_budgeted_curve_and_budget_lookup():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, 10, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    labels = logits[-1].argmax(-1)
    conf, pred = confidences_from_logits(logits)
    curve = budgeted_curve(conf[:, :250], conf[:, 250:], pred[:, 250:], labels[250:], [1e6, 2e6, 3e6])
    assert set(curve) == {"budgets", "thresholds", "macs", "accuracy"}
    assert len(curve["thresholds"]) == 39 and all(len(t) == 3 for t in curve["thresholds"])
    assert all(isinstance(x, float) for x in curve["macs"] + curve["accuracy"])
    assert all(1e6 <= m <= 3e6 for m in curve["macs"])
    # The lookup returns the most expensive budget that fits.
    target = 2e6
    thr = thresholds_for_budget(curve, target)
    best = max(m for m in curve["macs"] if m <= target)
    sim = simulate_exits(conf[:, 250:], pred[:, 250:], labels[250:], thr, [1e6, 2e6, 3e6])
    assert sim["macs"] == best
    with pytest.raises(ValueError, match="smallest available"):
        thresholds_for_budget(curve, min(curve["macs"]) - 1)


def test_budget_outside_the_curve_names_its_range():
    curve = {"macs": [2e6, 1e6, 3e6], "accuracy": [50.0, 40.0, 60.0],
             "thresholds": [[0.5, -1e8], [0.1, -1e8], [0.9, -1e8]]}
    assert budget_index(curve, 2.5e6) == 0
    assert budget_index(curve, 3e6) == 2                    # the end itself: no warning
    with pytest.raises(BudgetOutOfRangeError, match="spans 1e\\+06 to 3e\\+06 MACs per image"):
        budget_index(curve, 0.5e6)
    with pytest.raises(BudgetOutOfRangeError, match="> 0"):
        budget_index(curve, 0)
    with pytest.warns(BudgetAboveCurveWarning, match="above the calibrated curve \\(1e\\+06 to 3e\\+06"):
        assert budget_index(curve, 5e6) == 2
