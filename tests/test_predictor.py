"""Real early exit (predictor.py) against the simulation of exits.py."""
import re

import pytest
import torch

from glancefocus import create_model, exits
from glancefocus.predictor import Predictor, predict


def spread_model(seed=0):
    """A random demo model whose confidences spread over (0.2, 1) and whose labels vary:
    random encoders give similar features for every image, so amplify their differences."""
    torch.manual_seed(seed)
    model = create_model("demo").eval()
    with torch.no_grad():
        model.classifier.fc.weight.normal_(0, 3)
        model.classifier.fc.bias.zero_()
        model.classifier.rnn.weight_ih_l0.mul_(30)
    model.class_names = [f"class{k}" for k in range(10)]
    return model


def varied_images(n, seed, side=48):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, side, side, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 3
            + torch.randn(n, 1, 1, 1, generator=g))


def all_steps(model, images):
    with torch.inference_mode():
        out = model(images)
    conf, pred = exits.confidences_from_logits(out.logits)
    return conf, pred, out.boxes


@pytest.fixture(scope="module")
def setup():
    model = spread_model()
    calib_conf, _, _ = all_steps(model, varied_images(300, seed=1))
    images = varied_images(200, seed=2)
    conf, pred, boxes = all_steps(model, images)
    return model, calib_conf, images, conf, pred, boxes


@pytest.mark.parametrize("budget_index", [0, 4, 9, 19, 29, 38])
def test_predictor_equals_simulation(setup, budget_index):
    model, calib_conf, images, conf, pred, boxes = setup
    thresholds = exits.calibrate_budgets(calib_conf)[budget_index]
    # Thresholds come from other images: no confidence sits on a threshold, so tiny float
    # differences between full-batch and sub-batch computation could not flip an exit.
    gap = (conf.double() - thresholds[:, None]).abs()
    assert gap.min() > 1e-6
    step_macs = model.macs()["per_step"]
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    sim = exits.simulate_exits(conf, pred, labels, thresholds, step_macs)

    batch = Predictor(model, thresholds=thresholds).run(images)

    assert torch.equal(batch.exit_steps - 1, sim["exit_step"])
    assert torch.equal(batch.labels, sim["pred"])
    taken = conf.gather(0, sim["exit_step"][None])[0]
    assert torch.allclose(batch.confidences, taken, atol=1e-6)
    assert batch.macs.tolist() == [step_macs[s] for s in sim["exit_step"].tolist()]
    for i, step in enumerate(batch.exit_steps.tolist()):
        assert torch.equal(batch.boxes[i, :step], boxes[:step, i])
        assert (batch.boxes[i, step:] == -1).all()
    expected_macs = float(batch.macs.double().mean())
    assert expected_macs == pytest.approx(sim["macs"], rel=1e-9)


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
    assert [p.label for p in everyone_at_glance] == pred[0, :5].tolist()
    assert everyone_at_glance[0].class_name == f"class{pred[0, 0]}"
    assert everyone_at_glance[0].macs == model.macs()["per_step"][0]
    assert len(everyone_at_glance[0].boxes) == 1

    full = predict(model, images[:5])  # no budget, no thresholds: every step
    assert [p.exit_step for p in full] == [3] * 5
    assert [p.label for p in full] == pred[-1, :5].tolist()
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
        assert spent <= budget
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
    model = spread_model().train()
    Predictor(model).run(varied_images(4, seed=3))
    assert model.training
