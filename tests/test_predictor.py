"""Real early exit (predictor.py) against the simulation of exits.py."""
import re

import pytest
import torch
from engine_parity import (
    allowed_near_ties,
    assert_same_answers,
    near_ties,
    spread_demo,
    torch_steps,
    varied_images,
)

from glancefocus import exits
from glancefocus.predictor import Predictor, predict

CROP_SPAN = (48 - 32, 48 - 32)  # varied_images' side less the demo's patch


def all_steps(model, images):
    with torch.inference_mode():
        out = model(images)
    conf, pred = exits.confidences_from_logits(out.logits)
    return conf, pred, out.boxes


@pytest.fixture(scope="module")
def setup():
    model = spread_demo()
    calib_conf, _, _ = all_steps(model, varied_images(300, seed=1))
    images = varied_images(200, seed=2)
    conf, pred, boxes = all_steps(model, images)
    return model, calib_conf, images, conf, pred, boxes


@pytest.mark.parametrize("budget_index", [0, 4, 9, 19, 29, 38])
def test_predictor_equals_simulation(setup, budget_index):
    model, calib_conf, images, conf, pred, boxes = setup
    thresholds = exits.calibrate_budgets(calib_conf)[budget_index]
    step_macs = model.macs()["per_step"]
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    sim = exits.simulate_exits(conf, pred, labels, thresholds, step_macs)

    batch = Predictor(model, thresholds=thresholds).run(images)

    # The simulation's logits come from one batch of 200, the predictor's from shrinking batches:
    # other kernels, so an image next to a decision boundary may go either way (engine_parity).
    logits, locations = torch_steps(model, images)
    near = near_ties(logits, locations, thresholds.tolist(), CROP_SPAN)
    steps = torch.arange(1, model.max_steps + 1)
    sim_boxes = boxes.permute(1, 0, 2).masked_fill(steps[None, :, None] > sim["exit_step"][:, None, None] + 1, -1)
    assert_same_answers({"exit_steps": sim["exit_step"] + 1, "labels": sim["pred"], "boxes": sim_boxes},
                        {"exit_steps": batch.exit_steps, "labels": batch.labels, "boxes": batch.boxes},
                        near, f"budget {budget_index}")
    clear = torch.from_numpy(~near)
    taken = conf.gather(0, sim["exit_step"][None])[0]
    assert torch.allclose(batch.confidences[clear], taken[clear], atol=1e-6)
    assert batch.macs.tolist() == [step_macs[s - 1] for s in batch.exit_steps.tolist()]
    if not near.any():
        assert float(batch.macs.double().mean()) == pytest.approx(sim["macs"], rel=1e-9)


def test_a_middle_budget_exits_at_every_step(setup):
    """The equality test above is only meaningful if images do leave at every step."""
    model, calib_conf, images, *_ = setup
    batch = Predictor(model, thresholds=exits.calibrate_budgets(calib_conf)[19]).run(images)
    counts = torch.bincount(batch.exit_steps, minlength=model.max_steps + 1)[1:]
    assert (counts > 10).all(), counts
    assert len(batch.labels.unique()) > 2


def test_later_steps_compute_only_on_running_images(setup):
    model, calib_conf, images, *_ = setup
    seen = []
    hook = model.focus_encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    try:
        batch = Predictor(model, thresholds=exits.calibrate_budgets(calib_conf)[9]).run(images)
    finally:
        hook.remove()
    still_running = [int((batch.exit_steps > k).sum()) for k in range(1, model.max_steps)]
    assert seen == still_running
    assert seen[0] < images.shape[0]


def test_explicit_thresholds_and_model_predict(setup):
    model, _, images, conf, pred, _ = setup
    everyone_at_glance = model.predict(images[:5], thresholds=torch.tensor([0.0, 0.0, -1e8]))
    assert [p.exit_step for p in everyone_at_glance] == [1] * 5
    # pred comes from a batch of 200, the answers from a batch of 5: other kernels
    logits, _ = torch_steps(model, images[:5])
    tie = near_ties(logits, None, [0.0, 0.0, -1e8])
    assert [p.label for p, t in zip(everyone_at_glance, tie) if not t] == pred[0, :5][~tie].tolist()
    assert everyone_at_glance[0].class_name == f"class{pred[0, 0]}"
    assert everyone_at_glance[0].macs == model.macs()["per_step"][0]
    assert len(everyone_at_glance[0].boxes) == 1

    full = predict(model, images[:5])  # no budget, no thresholds: every step
    assert [p.exit_step for p in full] == [3] * 5
    tie = near_ties(logits, None, [exits.BIG, exits.BIG, -exits.BIG])
    assert [p.label for p, t in zip(full, tie) if not t] == pred[-1, :5][~tie].tolist()
    assert tie.sum() <= allowed_near_ties(5)
    assert [len(p.boxes) for p in full] == [3] * 5
    assert set(full[0].to_dict()) == {"label", "class_name", "confidence", "exit_step", "macs", "boxes",
                                      "top_k"}


def test_budget_uses_the_calibrated_curve(setup):
    model, calib_conf, images, conf, pred, _ = setup
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    step_macs = model.macs()["per_step"]
    model.exit_curve = exits.budgeted_curve(calib_conf, conf, pred, labels, step_macs)
    try:
        budget = model.exit_curve["macs"][10] * 1.0001
        predictor = Predictor(model, budget=budget)
        assert torch.equal(predictor.thresholds, exits.thresholds_for_budget(model.exit_curve, budget))
        spent = predictor.run(images).macs.double().mean()
        # the curve's MACs come from one batch of 200: an image next to a threshold may exit a
        # step later here (engine_parity), and each such image may add its share of the rest
        logits, _ = torch_steps(model, images)
        near = near_ties(logits, None, predictor.thresholds.tolist())
        assert near.sum() <= allowed_near_ties(len(near))
        assert spent <= budget + near.sum() * (step_macs[-1] - step_macs[0]) / len(near)
        with pytest.raises(exits.BudgetOutOfRangeError, match="no budget fits .* spans"):
            Predictor(model, budget=step_macs[0] * 0.5)
    finally:
        model.exit_curve = None


def test_budget_above_the_curve_warns_and_uses_its_end(setup):
    """model.predict(budget=...) behaves as `predict --budget`: above the calibrated curve it says
    so, naming the curve's range, and uses the most expensive calibrated budget."""
    model, calib_conf, images, conf, pred, _ = setup
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    model.exit_curve = exits.budgeted_curve(calib_conf, conf, pred, labels, model.macs()["per_step"])
    try:
        most = max(model.exit_curve["macs"])
        with pytest.warns(exits.BudgetAboveCurveWarning, match=re.escape(f"to {most:.6g} MACs per image")):
            answers = model.predict(images[:4], budget=most * 10)
        end = exits.budget_index(model.exit_curve, most)
        expected = Predictor(model, thresholds=model.exit_curve["thresholds"][end]).predict(images[:4])
        assert [a.exit_step for a in answers] == [e.exit_step for e in expected]
        with pytest.raises(exits.BudgetOutOfRangeError, match="spans"):
            model.predict(images[:4], budget=min(model.exit_curve["macs"]) / 2)
    finally:
        model.exit_curve = None


def test_top_k_lists_the_most_probable_classes_at_the_exit_step(setup):
    model, _, images, *_ = setup
    with torch.inference_mode():
        logits = model(images[:6]).logits
    answers = Predictor(model, thresholds=[0.0, 0.0, -1e8], top_k=3).predict(images[:6])
    probs = torch.softmax(logits[0].float(), dim=-1)  # everyone exits at the glance
    for i, answer in enumerate(answers):
        assert [c["label"] for c in answer.top_k] == probs[i].topk(3).indices.tolist()
        assert [c["probability"] for c in answer.top_k] == pytest.approx(probs[i].topk(3).values.tolist())
        assert answer.top_k[0]["label"] == answer.label
        assert answer.top_k[0]["probability"] == pytest.approx(answer.confidence)
        assert answer.top_k[1]["class_name"] == f"class{answer.top_k[1]['label']}"
    with pytest.raises(ValueError, match="top_k"):
        Predictor(model, top_k=0)
    assert Predictor(model, top_k=50).top_k == 10   # at most the number of classes


def test_budget_without_a_curve_says_to_run_evaluate(setup):
    model = setup[0]
    assert model.exit_curve is None
    with pytest.raises(ValueError, match="glancefocus evaluate"):
        Predictor(model, budget=1e9)


def test_bad_arguments(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="not both"):
        Predictor(model, thresholds=[0.5, 0.5, -1e8], budget=1e9)
    with pytest.raises(ValueError, match="need 3 thresholds"):
        Predictor(model, thresholds=[0.5, -1e8])


def test_device_auto_and_unusable_devices(monkeypatch):
    from glancefocus.predictor import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu-please")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_training_mode_is_restored():
    model = spread_demo().train()
    Predictor(model).run(varied_images(4, seed=3))
    assert model.training
