"""The training loop's data and bookkeeping: per-item augmentation seeds (exact mid-epoch resume
with any number of workers), the automatic worker count, PPO diagnostics measured after the
update, and no collective per batch (CPU, offline, seconds each)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import replace

import pytest
import torch
from PIL import Image
from test_train import tiny_config

from glancefocus.config import DataConfig
from glancefocus.data import ImageFolderDataset
from glancefocus.model import GlanceFocusNet
from glancefocus.train.context import STOP_POLL_EVERY, StageRun
from glancefocus.train.faults import NonFiniteGuard
from glancefocus.train.loaders import make_loader, resolve_num_workers
from glancefocus.train.ppo import PPOLoss, collect_rollout, policy_optimizer, ppo_update
from glancefocus.train.runtime import Runtime
from glancefocus.train.supervised import GlanceFocusLoss, train_epoch

CPU = Runtime(torch.device("cpu"))


def write_images(root, per_class=6, size=(40, 32)):
    """ROOT/train/<a|b>/*.png of random pixels: random crops of them differ visibly."""
    generator = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 255, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def augmented_set(root):
    config = DataConfig(root=str(root), image_size=16, resize_size=16)
    return ImageFolderDataset(root, "train", config, train=True)


def epoch_batches(dataset, workers, epoch=0, skip=0):
    loader = make_loader(dataset, 4, CPU, seed=3, epoch=epoch, shuffle=True, num_workers=workers,
                         skip_batches=skip)
    return [(images, labels) for images, labels in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
        assert torch.equal(labels_a, labels_b)
        assert torch.equal(images_a, images_b)  # bit-identical crops and flips


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    dataset = augmented_set(write_images(tmp_path))
    state = torch.get_rng_state()
    in_process = epoch_batches(dataset, workers=0)
    assert torch.equal(torch.get_rng_state(), state)  # reading moved no global random stream
    assert_same_batches(in_process, epoch_batches(dataset, workers=2))
    # resuming after the first batch, with workers: the rest of the epoch, bit for bit
    assert_same_batches(in_process[1:], epoch_batches(dataset, workers=2, skip=1))
    assert_same_batches(in_process[2:], epoch_batches(dataset, workers=0, skip=2))
    # the next epoch draws other crops (the order is fixed here to compare image by image)
    first = make_loader(dataset, 12, CPU, seed=3, epoch=0, shuffle=False)
    second = make_loader(dataset, 12, CPU, seed=3, epoch=1, shuffle=False)
    assert not torch.equal(next(iter(first))[0], next(iter(second))[0])


def test_automatic_worker_count():
    assert resolve_num_workers(-1, "cpu") == 0  # the step keeps the cores busy already
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert resolve_num_workers(-1, "cuda", local_processes=1) == max(1, min(8, cores))
    assert resolve_num_workers(-1, "cuda", local_processes=10 * cores) == 1
    assert resolve_num_workers(0, "cuda") == 0 and resolve_num_workers(3, "cpu") == 3
    with pytest.raises(ValueError, match="data.num_workers must be >= 0, or -1"):
        resolve_num_workers(-2, "cpu")
    assert DataConfig().num_workers == -1


def policy_only(config):
    """A 10-class GFNet in eval mode, as stage 2 has it: only the policy trains."""
    model = GlanceFocusNet(replace(config.model, num_classes=10)).eval()
    model.requires_grad_(False)
    model.policy.requires_grad_(True)
    return model


def test_ppo_statistics_measure_the_update(tmp_path):
    config = tiny_config(tmp_path, "train.stage2.ppo_epochs=1", "train.stage2.ppo_lr=0.01")
    torch.manual_seed(0)
    model = policy_only(config)
    stage = config.train.stage2
    images = torch.randn(16, 1, 48, 48)
    labels = torch.randint(0, 10, (16,))
    rollout = collect_rollout(model, images, labels, CPU, torch.Generator().manual_seed(1))
    loss = PPOLoss(model.policy, stage.ppo_clip, stage.value_coef, stage.entropy_coef)
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=stage.ppo_lr)
    stats = ppo_update(loss, optimizer, rollout, stage, CPU, NonFiniteGuard(0), where="test")
    # one PPO epoch: measured before the step these would be exactly 0
    assert stats["approx_kl"] > 0
    assert 0 <= stats["clip_fraction"] <= 1
    # per focus step (the glance has no reward), accuracy per step (glance = step 1)
    assert len(stats["reward_focus"]) == config.model.max_steps - 1
    assert len(stats["accuracy"]) == config.model.max_steps


class _Batches:
    """A loader stand-in: fixed batches, and the dataset a stand-in batch is read from."""

    def __init__(self, batches, dataset=None):
        self.batches, self.dataset = batches, dataset

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _tiny_training(tmp_path):
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = GlanceFocusNet(replace(config.model, num_classes=10))
    loss = GlanceFocusLoss(model, 1.0, random_locations=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(8, 1, 48, 48), torch.randint(0, 10, (8,)), torch.zeros(8, 4))
    return model, loss, optimizer, batch


def test_no_collective_per_batch(tmp_path, monkeypatch):
    model, loss, optimizer, batch = _tiny_training(tmp_path)
    calls = []
    real = Runtime.sum_across_ranks
    monkeypatch.setattr(Runtime, "sum_across_ranks", lambda self, v: calls.append(1) or real(self, v))
    metrics = train_epoch(loss, model, _Batches([batch] * 5), optimizer, CPU, NonFiniteGuard(0),
                          steps=3, progress=False)
    assert len(calls) == 1  # the epoch's totals, not one per batch
    assert metrics["skipped_nonfinite"] == 0 and len(metrics["train_accuracy"]) == 3


def test_stop_flags_are_compared_every_few_batches(tmp_path):
    compared = []

    class TwoProcesses(Runtime):
        def sum_across_ranks(self, values):
            compared.append(1)
            return values.double()  # as if the other process had no signal

    run = StageRun(1, tiny_config(tmp_path), None, None, None, TwoProcesses(torch.device("cpu"), 0, 2))
    assert not any(run.stop_poll() for _ in range(2 * STOP_POLL_EVERY + 1))
    assert len(compared) == 2
    run.stop_flag.signum = 15
    assert not any(run.stop_poll() for _ in range(STOP_POLL_EVERY - 2))  # seen at the next poll
    assert run.stop_poll() and len(compared) == 3


def test_a_stand_in_batch_adds_nothing(tmp_path, monkeypatch):
    # a process whose batch was all unreadable still runs the step, with weight 0
    model, loss, optimizer, batch = _tiny_training(tmp_path)
    monkeypatch.setattr(Runtime, "sum_across_ranks", lambda self, v: v.detach().double())
    two = Runtime(torch.device("cpu"), 0, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = [(batch[0][i], int(batch[1][i]), batch[2][i]) for i in range(8)]
    metrics = train_epoch(loss, model, _Batches([None, None], dataset), optimizer, two,
                          NonFiniteGuard(0), steps=3, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key  # no gradient, no BatchNorm statistics
    assert metrics["loss"] == 0.0 and metrics["skipped_nonfinite"] == 0


def test_stage2_rollout_is_evaluated_by_ppos_first_pass_as_before_it(tmp_path):
    """The rollout leaves its evaluation to PPO's first pass, which gives the collecting
    policy's log-probabilities and values to the bit (as a pass before the update did)."""
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = policy_only(config)
    images, labels = torch.randn(6, 1, 48, 48), torch.randint(0, 10, (6,))
    rollout = collect_rollout(model, images, labels, CPU, torch.Generator().manual_seed(1))
    assert rollout.log_probs is None
    with torch.no_grad():
        before = model.policy.evaluate(rollout.states, rollout.actions)
    stage = config.train.stage2
    loss = PPOLoss(model.policy, stage.ppo_clip, stage.value_coef, stage.entropy_coef)
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=stage.ppo_lr)
    stats = ppo_update(loss, optimizer, rollout, stage, CPU, NonFiniteGuard(0), where="test",
                       movement=False)
    assert torch.equal(rollout.log_probs, before.log_probs)
    assert torch.equal(rollout.values, before.values)
    assert "approx_kl" not in stats and "explained_variance" in stats


def _one_update(tmp_path, make_optimizer):
    """The policy's parameters and the statistics after one stage-2 update of two PPO epochs
    (two optimiser steps) on a rollout from a fixed seed: both optimisers see the same rollout,
    so no sampled location or crop can differ between them."""
    config = tiny_config(tmp_path, "train.stage2.ppo_epochs=2", "train.stage2.ppo_lr=0.01")
    torch.manual_seed(0)
    model = policy_only(config)
    stage = config.train.stage2
    loss = PPOLoss(model.policy, stage.ppo_clip, stage.value_coef, stage.entropy_coef)
    optimizer = make_optimizer(model.policy, stage.ppo_lr)
    images, labels = torch.randn(8, 1, 48, 48), torch.randint(0, 10, (8,))
    rollout = collect_rollout(model, images, labels, CPU, torch.Generator().manual_seed(1))
    stats = ppo_update(loss, optimizer, rollout, stage, CPU, NonFiniteGuard(0), where="test")
    return [p.detach().clone() for p in model.policy.parameters()], stats


def test_policy_optimizer_updates_as_plain_adam(tmp_path):
    """The policy's optimiser (fused on CPU) moves the policy as PyTorch's plain Adam with the
    authors' betas does, up to float rounding, and the logged statistics agree."""
    fast, fast_stats = _one_update(tmp_path, policy_optimizer)
    plain, plain_stats = _one_update(
        tmp_path, lambda policy, lr: torch.optim.Adam(policy.parameters(), lr=lr,
                                                      betas=(0.9, 0.999)))
    assert any(not torch.equal(p, q) for p, q in zip(fast, _initial_policy(tmp_path)))
    for p, q in zip(fast, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert fast_stats.keys() == plain_stats.keys()
    for key in fast_stats:
        assert fast_stats[key] == pytest.approx(plain_stats[key], rel=1e-4, abs=1e-5,
                                                nan_ok=True), key


def _initial_policy(tmp_path):
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = GlanceFocusNet(replace(config.model, num_classes=10))
    return [p.detach().clone() for p in model.policy.parameters()]


def test_stage2_episodes_are_those_of_the_loop_before_it_moved_into_the_model():
    from glancefocus.model import create_model
    from glancefocus.train.ppo import _episode

    torch.manual_seed(0)
    model = create_model("demo", patch_size=16).eval()
    images, labels = torch.randn(4, 1, 48, 48), torch.randint(0, 10, (4,))
    # a frozen copy of ppo._episode's loop before the step loop moved into the model
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        states, actions, logits = [], [], []
        out = model.step(images)
        logits.append(out.logits)
        for _ in range(1, model.config.max_steps):
            states.append(out.state.feature_map.float())
            out = model.step(images, out.state, sample=True, generator=generator)
            actions.append(out.location)
            logits.append(out.logits)
        episode = _episode(model, images, labels, CPU, torch.Generator().manual_seed(7))
    assert torch.equal(episode.states, torch.stack(states))
    assert torch.equal(episode.actions, torch.stack(actions))
    assert torch.equal(episode.logits, torch.stack(logits))
