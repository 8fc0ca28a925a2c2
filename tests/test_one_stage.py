"""The one-stage recipe (train.recipe=one-stage) on tiny cluttered MNIST: it learns, the policy
is updated during the run, resume is exact, two processes agree, and its model is a GFNet like
any other."""
import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from glancefocus.checkpoint import load_checkpoint, read_checkpoint
from glancefocus.config import ConfigError, load_config
from glancefocus.presets import get_preset
from glancefocus.train import train
from glancefocus.train.command import describe_recipe
from glancefocus.train.one_stage import focus_fraction, random_fraction
from glancefocus.train.one_stage_loss import OneStageLoss
from glancefocus.train.ppo import rollout_of
from glancefocus.train.state import ONE_STAGE, final_checkpoint

TINY = ["data.canvas_size=48", "data.image_size=48", "model.patch_size=16", "data.num_clutter=2",
        "data.train_canvases=96", "data.test_canvases=64", "train.batch_size=32",
        "model.classifier_hidden=32", "model.policy_hidden=32", "train.recipe=one-stage",
        "train.one_stage.epochs=2"]


def one_stage_config(out_dir, *overrides):
    return load_config(None, TINY + [f"train.out_dir={out_dir}", *overrides], base=get_preset("demo"))


def weights(path):
    return read_checkpoint(path)["state_dict"]


class _Interrupt(Exception):
    pass


def test_loss_falls_and_the_policy_is_updated(tmp_path):
    # uncluttered 32 x 32 canvases: easy enough to learn in a few dozen steps
    config = one_stage_config(tmp_path, "data.canvas_size=32", "data.image_size=32",
                              "data.num_clutter=0", "data.train_canvases=256",
                              "train.one_stage.epochs=4", "train.one_stage.backbone_lr=0.1",
                              "train.one_stage.classifier_lr=0.1")
    history = train(config, progress=False)[ONE_STAGE]
    losses = [epoch["loss"] for epoch in history]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(math.isfinite(loss) for loss in losses)
    # a PPO update after every classifier step: 8 batches per epoch
    assert [epoch["ppo_updates"] for epoch in history] == [8, 8, 8, 8]
    assert history[0]["random_fraction"] == 0.5 and history[-1]["random_fraction"] == 0.0
    for key in ("ppo_approx_kl", "ppo_clip_fraction", "ppo_explained_variance", "ppo_entropy"):
        assert all(key in epoch for epoch in history), key
    assert len(history[-1]["ppo_reward_focus"]) == 2  # T 3: two focus steps
    folder = tmp_path / "one-stage"
    assert {p.name for p in folder.iterdir()} >= {"last.pt", "best.pt", "metrics.csv", "ppo.csv"}
    rows = (folder / "ppo.csv").read_text().splitlines()
    assert len(rows) == 1 + 32 and "approx_kl" in rows[0] and "reward_focus_2" in rows[0]
    assert final_checkpoint(tmp_path, "one-stage") == folder / "last.pt"


def test_the_policy_moves_and_everything_else_trains(tmp_path):
    config = one_stage_config(tmp_path, "train.one_stage.epochs=1")
    from glancefocus.model import GlanceFocusNet
    from glancefocus.train.runtime import STREAM_INIT, derive_seed, seed_everything

    seed_everything(derive_seed(config.train.seed, STREAM_INIT, ONE_STAGE))
    before = GlanceFocusNet(replace(config.model, num_classes=10)).state_dict()
    train(config, progress=False)
    after = weights(tmp_path / "one-stage" / "last.pt")
    for part in ("policy.", "glance_encoder.", "focus_encoder.", "classifier."):
        keys = [k for k in before if k.startswith(part) and before[k].is_floating_point()]
        assert any(not torch.equal(before[k], after[k]) for k in keys), part


def test_one_stage_model_evaluates_and_predicts_like_any_other(tmp_path):
    train(one_stage_config(tmp_path), progress=False)
    model = load_checkpoint(tmp_path / "one-stage" / "last.pt")
    images = torch.randn(4, 1, 48, 48)
    model.eval()
    predictions = model.predict(images, thresholds=torch.full((3,), 2.0))
    assert [p.exit_step for p in predictions] == [3, 3, 3, 3]
    assert model.macs()["per_step"][0] > 0


def test_resume_gives_the_same_weights(tmp_path):
    # a PPO update every 2 of an epoch's 3 steps (the last alone) and a falling focus share
    settings = ["train.one_stage.epochs=3", "train.one_stage.ppo_every=2",
                "train.one_stage.focus_fraction=1.0", "train.one_stage.focus_fraction_end=0.5"]
    reference = tmp_path / "reference"
    history = train(one_stage_config(reference, *settings), progress=False)[ONE_STAGE]
    assert [epoch["ppo_updates"] for epoch in history] == [2, 2, 2]
    assert [epoch["focus_fraction"] for epoch in history] == [1.0, 0.75, 0.5]

    run = tmp_path / "interrupted"
    config = one_stage_config(run, *settings)

    def stop_after_epoch(epoch):
        def hook(stage, training):
            if training["epoch"] == epoch:
                raise _Interrupt
        return hook

    with pytest.raises(_Interrupt):
        train(config, progress=False, on_checkpoint=stop_after_epoch(1))
    with pytest.raises(_Interrupt):
        train(config, resume=True, progress=False, on_checkpoint=stop_after_epoch(2))
    assert read_checkpoint(run / "one-stage" / "last.pt")["training"]["update"] == 4
    train(config, resume=True, progress=False)
    a, b = weights(reference / "one-stage" / "last.pt"), weights(run / "one-stage" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the policy's log holds every update once
    rows = (run / "one-stage" / "ppo.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [str(u) for u in range(1, 7)]


def test_accumulation_bf16_channels_last(tmp_path):
    config = one_stage_config(tmp_path, "train.micro_batch=12", "train.amp=bf16",
                              "train.channels_last=true", "train.one_stage.epochs=1")
    epoch = train(config, progress=False)[ONE_STAGE][0]
    assert math.isfinite(epoch["loss"]) and epoch["ppo_updates"] == 3


def test_rollout_log_probs_under_autocast_are_the_updates_float32_ones():
    from glancefocus.model import create_model

    model = create_model("demo", patch_size=16)
    loss = OneStageLoss(model, dsn_ratio=1.0, random_fraction=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # two steps' forward passes, joined
        loss(torch.randn(4, 1, 48, 48), torch.randint(0, 10, (4,)))
        loss(torch.randn(3, 1, 48, 48), torch.randint(0, 10, (3,)))
    rollout = rollout_of(model.policy, loss.take_episodes())
    assert rollout.states.shape[:2] == (2, 7) and rollout.true_probs.shape == (3, 7)
    log_probs = model.policy.evaluate(rollout.states, rollout.actions).log_probs
    assert rollout.log_probs.dtype == torch.float32
    assert torch.equal(rollout.log_probs, log_probs)  # PPO's first ratio is exactly 1


def test_stages_cannot_be_chosen_in_one_stage(tmp_path):
    with pytest.raises(ValueError, match="drop --stage"):
        train(one_stage_config(tmp_path), stages=[2], progress=False)
    with pytest.raises(ValueError, match="train.recipe must be one of"):
        train(one_stage_config(tmp_path, "train.recipe=two-stage"), progress=False)
    with pytest.raises(ValueError, match="random_fraction_start must be in"):
        train(one_stage_config(tmp_path, "train.one_stage.random_fraction_start=1.5"),
              progress=False)
    with pytest.raises(ValueError, match="glance_loss_weight must be > 0"):
        train(one_stage_config(tmp_path, "train.one_stage.glance_loss_weight=0"), progress=False)
    with pytest.raises(ValueError, match=r"focus_fraction must be in \(0, 1\]"):
        train(one_stage_config(tmp_path, "train.one_stage.focus_fraction=0"), progress=False)
    with pytest.raises(ValueError, match=r"focus_fraction_end must be in \(0, 1\]"):
        train(one_stage_config(tmp_path, "train.one_stage.focus_fraction_end=1.5"), progress=False)
    with pytest.raises(ValueError, match="ppo_every must be >= 1, got 0"):
        train(one_stage_config(tmp_path, "train.one_stage.ppo_every=0"), progress=False)
    with pytest.raises(ValueError, match="ppo_min_rollout must be >= 0"):
        train(one_stage_config(tmp_path, "train.one_stage.ppo_min_rollout=-1"), progress=False)
    with pytest.raises(ValueError, match="focus_on must be 'first' or 'uncertain'"):
        train(one_stage_config(tmp_path, "train.one_stage.focus_on=hardest"), progress=False)


def test_random_and_focus_fractions_fall_linearly():
    settings = load_config(None, ["train.one_stage.epochs=5"]).train.one_stage
    assert [random_fraction(settings, e) for e in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert [focus_fraction(settings, e) for e in range(5)] == [1.0] * 5  # no end: constant
    settings.focus_fraction, settings.focus_fraction_end = 0.5, 0.3
    assert [round(focus_fraction(settings, e), 6) for e in range(5)] == [0.5, 0.45, 0.4, 0.35, 0.3]


def test_loss_splits_the_batch_and_keeps_the_policy_rollout():
    from glancefocus.model import create_model

    model = create_model("demo", patch_size=16)
    loss = OneStageLoss(model, dsn_ratio=1.0, random_fraction=0.25)
    images, labels = torch.randn(8, 1, 48, 48), torch.randint(0, 10, (8,))
    value, logits = loss(images, labels, torch.Generator().manual_seed(0))
    value.backward()
    assert logits.shape == (3, 8, 10)
    assert all(p.grad is None for p in model.policy.parameters())  # PPO trains the policy
    rollout = rollout_of(model.policy, loss.take_episodes())
    assert rollout.states.shape[:2] == (2, 6)   # 2 of 8 images at random locations
    assert rollout.actions.shape == (2, 6, 2) and rollout.true_probs.shape == (3, 6)
    assert loss.take_episodes() == []
    assert OneStageLoss(model, 1.0, random_fraction=0.9).random_count(4) == 3  # one follows


def test_glance_weight_makes_a_weighted_mean_of_the_steps_losses():
    import torch.nn.functional as F

    from glancefocus.model import create_model

    model = create_model("demo", patch_size=16)
    images, labels = torch.randn(4, 1, 48, 48), torch.randint(0, 10, (4,))
    loss = OneStageLoss(model, dsn_ratio=0.0, random_fraction=1.0, glance_weight=3.0)
    value, logits = loss(images, labels, torch.Generator().manual_seed(0))
    steps = [F.cross_entropy(step, labels) for step in logits]
    expected = (3.0 * steps[0] + steps[1] + steps[2]) / 5.0
    assert torch.allclose(value, expected, rtol=1e-5)


def test_focus_fraction_trains_the_glance_on_the_whole_batch_and_the_focus_on_part():
    import torch.nn.functional as F

    from glancefocus.model import create_model

    model = create_model("demo", patch_size=16)
    images, labels = torch.randn(8, 1, 48, 48), torch.randint(0, 10, (8,))
    loss = OneStageLoss(model, dsn_ratio=0.0, random_fraction=0.5, focus_fraction=0.5,
                        focus_on="first")
    value, logits = loss(images, labels, torch.Generator().manual_seed(0))
    assert logits.shape == (3, 8, 10)
    assert logits[0].isfinite().all()                    # every image glanced
    assert logits[1:, :4].isfinite().all() and logits[1:, 4:].isnan().all()
    steps = [F.cross_entropy(logits[0], labels)]
    steps += [F.cross_entropy(step[:4], labels[:4]) for step in logits[1:]]
    assert torch.allclose(value, sum(steps) / 3, rtol=1e-5)
    rollout = rollout_of(model.policy, loss.take_episodes())
    assert rollout.states.shape[:2] == (2, 2)            # of 4 focusing images, 2 follow


def test_focus_on_uncertain_focuses_the_images_the_glance_is_least_sure_of():
    from glancefocus.model import create_model

    torch.manual_seed(0)
    model = create_model("demo", patch_size=16)
    images, labels = torch.randn(8, 1, 48, 48), torch.randint(0, 10, (8,))
    loss = OneStageLoss(model, dsn_ratio=0.0, random_fraction=0.5, focus_fraction=0.5,
                        focus_on="uncertain")
    _, logits = loss(images, labels, torch.Generator().manual_seed(0))
    confidence = logits[0].softmax(-1).amax(-1)
    focused = logits[1].isfinite().all(-1)
    assert int(focused.sum()) == 4 and logits[2, focused].isfinite().all()
    assert confidence[focused].max() < confidence[~focused].min()
    rollout = rollout_of(model.policy, loss.take_episodes())
    assert rollout.states.shape[:2] == (2, 2)  # of 4 focusing images, 2 follow
    # the same pixels, steps and classifier as when those images come first
    loss.focus_on = "first"
    order = torch.cat([focused.nonzero()[:, 0], (~focused).nonzero()[:, 0]])
    _, first = loss(images[order], labels[order], torch.Generator().manual_seed(0))
    assert torch.allclose(first[:, :4], logits[:, focused], atol=1e-5)


def test_training_accuracy_counts_only_the_steps_an_image_took():
    from torch import nn

    from glancefocus.train.runtime import start_runtime
    from glancefocus.train.supervised import _accuracies, _train_step

    class Fixed(nn.Module):
        """Predicts class 0 at both steps; the last two images skip step 2 (NaN rows)."""

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def forward(self, images, labels, generator=None):
            logits = torch.zeros(2, len(labels), 3)
            logits[..., 0] = 1.0
            logits[1, 2:] = float("nan")
            return self.weight * 1.0, logits

    module = Fixed()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    labels = torch.tensor([0, 1, 0, 0])
    totals = _train_step(module, torch.zeros(4, 1), labels, optimizer, start_runtime("cpu"),
                         steps=2, micro_batch=0, scaler=None, generator=None, weight=1.0)
    # step 1: 3 of 4 right; step 2: only the first two images count, 1 of 2 right
    assert _accuracies(totals.tolist(), 2) == [75.0, 50.0]


def test_print_config_counts_the_policy_updates(tmp_path):
    text = describe_recipe(one_stage_config(tmp_path))
    assert "one-stage: 2 epochs = 6 SGD steps, each followed by a PPO update" in text
    assert "the focus steps on 50% (first epoch) to 20% (last) of each batch" in text  # the demo's
    text = describe_recipe(one_stage_config(tmp_path, "train.one_stage.focus_fraction_end=null"))
    assert ("PPO update of the policy; the focus steps on 50% of each batch (those the glance is "
            "least sure of)") in text
    text = describe_recipe(one_stage_config(tmp_path, "train.one_stage.ppo_every=4",
                                            "train.one_stage.focus_fraction=0.5",
                                            "train.one_stage.focus_fraction_end=0.25"))
    assert ("6 SGD steps, and 2 PPO updates of the policy (one every 4 steps); the focus steps "
            "on 50% (first epoch) to 25% (last) of each batch") in text
    text = describe_recipe(one_stage_config(tmp_path, "train.one_stage.ppo_min_rollout=40"))
    assert ("6 SGD steps, and at most 6 PPO updates of the policy (one every step, once their "
            "rollout holds 40 images)") in text


def test_ddp_two_processes_agree(tmp_path, torchrun_train):
    # 3 steps: an update after the second and one after the third alone
    output = torchrun_train(*TINY, "train.one_stage.epochs=1", "train.one_stage.ppo_every=2",
                            f"train.out_dir={tmp_path}")
    assert "one-stage: the 2 processes hold identical weights" in output, output[-3000:]
    assert (tmp_path / "one-stage" / "last.pt").is_file()


def test_a_run_saved_before_the_recipe_key_existed_still_resumes():
    from glancefocus.config import to_dict
    from glancefocus.train.state import check_same_run

    current = to_dict(load_config(None, [], base=get_preset("demo")))
    older = {section: dict(values) for section, values in current.items()}
    del older["train"]["recipe"], older["train"]["one_stage"]
    check_same_run(older, current, "RUN/stage1/last.pt")  # settings newer than the run: no error
    changed = to_dict(load_config(None, ["train.recipe=one-stage"], base=get_preset("demo")))
    with pytest.raises(ConfigError, match="train.recipe"):
        check_same_run(current, changed, "RUN/stage1/last.pt")


def test_ppo_every_joins_the_steps_episodes_and_leaves_out_skipped_and_stand_in_steps(monkeypatch):
    from glancefocus.model import create_model
    from glancefocus.train import one_stage
    from glancefocus.train.faults import NonFiniteGuard
    from glancefocus.train.runtime import start_runtime

    model = create_model("demo", patch_size=16)
    settings = load_config(None, ["train.one_stage.ppo_every=3"]).train.one_stage
    loss = OneStageLoss(model, dsn_ratio=1.0, random_fraction=0.0)
    learner = one_stage.InterleavedPPO(model, loss, settings, start_runtime("cpu"), NonFiniteGuard(10))
    updates = []
    monkeypatch.setattr(one_stage, "ppo_update", lambda _loss, _opt, rollout, *args, weight, **kw:
                        updates.append((rollout.actions.shape[1], weight)) or {})

    def step(images, applied=True, weight=1.0):
        loss(torch.randn(images, 1, 48, 48), torch.randint(0, 10, (images,)))
        learner.after_step(applied, weight)

    step(2), step(3, applied=False), step(4, weight=0.0)
    assert updates == []                     # two applied steps so far
    step(5)                                  # the third: the real steps' 2 + 5 images
    step(6, weight=0.0), step(1, weight=0.0)
    learner.finish_epoch()                   # only stand-ins: the last one's, adding nothing
    learner.finish_epoch()                   # nothing left
    assert updates == [(7, 1.0), (1, 0.0)]
    assert learner.updates == 2


def _one_stage_before_issue_25(model, images, labels, generator, random_fraction):
    """A frozen copy of OneStageLoss's focus loop before the step loop moved into the model
    (focus_fraction 1, dsn_ratio 1, glance weight 1): the policy called directly, its sample
    drawn, then the uniform locations, then `model.step` at the chosen location."""
    import dataclasses

    import torch.nn.functional as F

    policy = model.policy
    out = model.step(images, aux=True)
    dsn = F.cross_entropy(out.aux_logits.float(), labels)
    state, logits, states, actions = out.state, [out.logits], [], []
    follows = torch.arange(len(labels)) >= int(random_fraction * len(labels))
    for _ in range(1, model.config.max_steps):
        with torch.no_grad():
            feature_map = state.feature_map.detach().float()
            proposal = policy(feature_map, state.policy_hidden)
            action = policy.sample(proposal.mean, generator)
            uniform = torch.rand(action.shape, generator=generator, dtype=action.dtype)
            location = torch.where(follows[:, None], action, uniform)
        states.append(feature_map)
        actions.append(action)
        out = model.step(images, dataclasses.replace(state, policy_hidden=proposal.hidden),
                         location=location, aux=True)
        state = out.state
        logits.append(out.logits)
        dsn = dsn + F.cross_entropy(out.aux_logits.float(), labels)
    ce = sum(F.cross_entropy(step.float(), labels) for step in logits) / len(logits)
    logits = torch.stack(logits).detach()
    return (ce + dsn / len(logits), torch.stack(states)[:, follows],
            torch.stack(actions)[:, follows], logits)


def test_one_stage_loss_and_rollout_are_those_of_the_loop_before_it_moved_into_the_model():
    from glancefocus.model import create_model

    torch.manual_seed(0)
    model = create_model("demo", patch_size=16)
    images, labels = torch.randn(8, 1, 48, 48), torch.randint(0, 10, (8,))
    old_loss, old_states, old_actions, old_logits = _one_stage_before_issue_25(
        model, images, labels, torch.Generator().manual_seed(3), random_fraction=0.25)
    loss = OneStageLoss(model, dsn_ratio=1.0, random_fraction=0.25)
    value, logits = loss(images, labels, torch.Generator().manual_seed(3))
    (episode,) = loss.take_episodes()
    assert torch.equal(value, old_loss) and torch.equal(logits, old_logits)
    assert torch.equal(episode.states, old_states) and torch.equal(episode.actions, old_actions)
    assert episode.actions.shape == (2, 6, 2) and torch.equal(episode.labels, labels[2:])


def test_explorers_look_at_uniform_draws_after_the_policys_noise():
    from glancefocus.model import create_model

    torch.manual_seed(0)
    model = create_model("demo", patch_size=16)
    images = torch.randn(4, 1, 48, 48)
    glance = model.step(images)
    explore = torch.tensor([True, False, True, False])
    out = model.step(images, glance.state, sample=True, explore=explore,
                     generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    policy = model.policy(glance.state.feature_map, None)
    sampled = model.policy.sample(policy.mean, generator)   # the policy's noise first,
    uniform = torch.rand(4, 2, generator=generator)         # then the uniform locations
    assert torch.equal(out.location[~explore], sampled[~explore])
    assert torch.equal(out.location[explore], uniform[explore])
    assert torch.equal(out.state.policy_hidden, policy.hidden)  # every row's GRU state advanced
    assert not out.policy.mean.requires_grad  # the policy acts without gradients


def test_ppo_min_rollout_waits_for_enough_images_and_the_epochs_last_update_takes_the_rest(monkeypatch):
    from glancefocus.model import create_model
    from glancefocus.train import one_stage
    from glancefocus.train.faults import NonFiniteGuard
    from glancefocus.train.runtime import Runtime, start_runtime

    model = create_model("demo", patch_size=16)
    settings = load_config(None, ["train.one_stage.ppo_every=2",
                                  "train.one_stage.ppo_min_rollout=10"]).train.one_stage
    loss = OneStageLoss(model, dsn_ratio=1.0, random_fraction=0.0)
    learner = one_stage.InterleavedPPO(model, loss, settings, start_runtime("cpu"), NonFiniteGuard(10))
    updates = []
    monkeypatch.setattr(one_stage, "ppo_update", lambda _loss, _opt, rollout, *args, weight, **kw:
                        updates.append(rollout.actions.shape[1]) or {})

    def step(images, weight=1.0):
        loss(torch.randn(images, 1, 48, 48), torch.randint(0, 10, (images,)))
        learner.after_step(True, weight)

    step(3), step(3), step(3, weight=0.0), step(3)
    assert updates == []                     # 9 images in four steps: fewer than 10
    step(3)                                  # 12
    step(2), step(4)                         # 6 images, enough steps: waits for more
    learner.finish_epoch()                   # the epoch's last update takes them
    assert updates == [12, 6]

    class TwoProcesses(Runtime):
        """Another process holds as many images as this one."""

        def sum_across_ranks(self, values):
            return values.detach().double() * 2

    learner.runtime = TwoProcesses(torch.device("cpu"), world_size=2)
    step(3), step(3)                         # 6 here, 12 in both processes together
    assert updates == [12, 6, 6]
