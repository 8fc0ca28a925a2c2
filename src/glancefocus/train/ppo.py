"""Stage 2: PPO on the patch policy alone (the paper's reward and the authors'
settings).

One update: the frozen model looks at a batch with locations sampled from the policy (the
rollout); the reward of focus step t is p_t(y) - p_(t-1)(y), the gain in the softmax probability
of the true class; discounted returns are normalised over the batch and steps (under torchrun:
over the whole batch of every process, as with one process); then ppo_epochs gradient steps on
the clipped objective, each on the whole batch. The logged approx KL and clip fraction compare
the policy after those steps with the one that collected the rollout, so they show how far an
update moved it (measured before the first step, they would always be 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..folding import folded_encoders
from .faults import NonFiniteGuard, step_finite
from .runtime import Runtime


@dataclass
class Rollout:
    states: torch.Tensor       # [S, B, C, h, w] the feature maps that chose the S focus locations
    actions: torch.Tensor      # [S, B, 2] the sampled locations
    true_probs: torch.Tensor   # [T, B] softmax probability of the true class after each step
    correct: torch.Tensor      # [T, B] whether each step's prediction is right
    # the collecting policy's evaluation of the rollout; None until PPO's first pass sets them
    # (see rollout_of's `evaluate`)
    log_probs: Optional[torch.Tensor] = None  # [S, B] the actions' log-probabilities
    values: Optional[torch.Tensor] = None     # [S, B] the critic's estimates at collection
    means: Optional[torch.Tensor] = None      # [S, B, 2] the mean locations, in [0, 1]

    def set_evaluation(self, evaluation) -> None:
        """The collecting policy's log-probabilities, values and means (an EpisodeEvaluation)."""
        self.log_probs = evaluation.log_probs.detach()
        self.values = evaluation.values.detach()
        self.means = evaluation.means.detach().float()

    @property
    def rewards(self) -> torch.Tensor:
        """[S, B]: the gain in the true class's probability of each focus step."""
        return self.true_probs[1:] - self.true_probs[:-1]


class Episode(NamedTuple):
    """The images that followed the policy in one forward pass, before the policy evaluates
    them: states [S, B, C, h, w], sampled actions [S, B, 2], per-step logits [T, B, K] and
    labels [B]."""
    states: torch.Tensor
    actions: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def collect_rollout(model, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime,
                    generator: torch.Generator, micro_batch: int = 0, fold: bool = True) -> Rollout:
    """Run the frozen model with sampled locations, micro-batch by micro-batch.

    On CPUs the images go channels-last: the frozen encoders' convolutions run faster so
    (oneDNN's native layout; ResNet-50 at P 96 about 0.75x the CPU time), and the crops keep
    the layout. The frozen encoders run with BatchNorm folded into their convolutions
    (folding.py; `fold=False`: as they are). The outputs differ from channels-first, unfolded
    ones only in float rounding. The rollout is not evaluated here: PPO's first pass does it
    (see ppo_update)."""
    if images.device.type == "cpu" and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    size = micro_batch if micro_batch > 0 else images.shape[0]
    encoders = (model.glance_encoder, model.focus_encoder) if fold else ()
    with folded_encoders(*encoders):
        episodes = [_episode(model, x, y, runtime, generator)
                    for x, y in zip(images.split(size), labels.split(size))]
    return rollout_of(model.policy, episodes, evaluate=False)


def _episode(model, images, labels, runtime: Runtime, generator) -> Episode:
    with runtime.autocast():
        out = model(images, sample=True, generator=generator, keep_states=True)
    return Episode(out.states, out.locations, out.logits, labels)


@torch.no_grad()
def rollout_of(policy, episodes: list[Episode], evaluate: bool = True) -> Rollout:
    """One rollout of the episodes' images (collected by the same policy, as it is now).

    evaluate: set the collecting policy's log-probabilities, values and means now; False
    leaves them to the first pass of ppo_update, which computes the same numbers with
    gradients (one pass of the policy over the rollout fewer)."""
    states = torch.cat([e.states for e in episodes], dim=1)
    actions = torch.cat([e.actions for e in episodes], dim=1)
    logits = torch.cat([e.logits for e in episodes], dim=1)
    labels = torch.cat([e.labels for e in episodes])
    logits = logits.float()
    true_probs = logits.softmax(-1).gather(2, labels.view(1, -1, 1).expand(len(logits), -1, 1))[..., 0]
    rollout = Rollout(states, actions, true_probs, logits.argmax(-1) == labels)
    if evaluate:
        # the collecting policy's log-probabilities and values in float32, outside autocast, as
        # PPO's update computes them (on the whole rollout at once), so its first ratio is exactly 1
        with torch.autocast(states.device.type, enabled=False):
            rollout.set_evaluation(policy.evaluate(states, actions))
    return rollout


def policy_optimizer(policy: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam for the patch policy, with the authors' betas.

    On CPU, PyTorch's fused Adam: one pass over each parameter instead of several passes with
    full-size temporaries. ResNet-50's policy has 46 M parameters, and with 2 threads its step
    takes 0.015 s instead of 0.18 s. The update is the same up to float rounding (about 1e-7
    relative). On other devices it is PyTorch's default Adam. A checkpoint saved before this
    change resumes with the optimiser settings it was saved with (load_state_dict restores
    them)."""
    params = list(policy.parameters())
    if params and all(p.device.type == "cpu" for p in params):
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except RuntimeError:  # PyTorch before 2.4 has no fused Adam on CPU
            pass
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_(t+1) along the step dimension of rewards [S, B]."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def normalise(values: torch.Tensor, eps: float = 1e-8, runtime: Optional[Runtime] = None,
              included: bool = True) -> torch.Tensor:
    """Zero mean, unit std over all elements (all-equal values become zeros, not NaN).

    Under torchrun the mean and std are those of every process's values together (one
    all-reduce of their sum, sum of squares and count, in float64); `included=False` leaves this
    process's values out of them (a stand-in batch)."""
    if runtime is None or not runtime.distributed:
        return (values - values.mean()) / (values.std(unbiased=False) + eps)
    flat = values.detach().double()
    local = torch.stack([flat.sum(), flat.square().sum(),
                         torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device)])
    total, squares, count = _sum_included(local, runtime, included).to(values.device)
    count = count.clamp(min=1.0)
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0.0).sqrt()
    return ((values - mean) / (std + eps)).to(values.dtype)


def _sum_included(local: torch.Tensor, runtime: Runtime, included: bool) -> torch.Tensor:
    """The sum over the processes of `local`, with zeros in its place when not `included`
    (not a multiplication by 0: a stand-in's NaN must not spread)."""
    return runtime.sum_across_ranks(local if included else torch.zeros_like(local))


class PPOLoss(nn.Module):
    """The clipped PPO objective of the policy, as a module DistributedDataParallel can wrap.

    logit_limit: when set, the square of how far a mean location's logit lies beyond
    +-logit_limit is added to the loss, so the actor's sigmoid stays where updates move it (see
    diagnosis.py for how a policy gets stuck at the edge without it).
    """

    def __init__(self, policy, clip: float, value_coef: float, entropy_coef: float,
                 logit_limit: Optional[float] = None):
        super().__init__()
        self.policy = policy
        self.clip, self.value_coef, self.entropy_coef = clip, value_coef, entropy_coef
        self.logit_limit = logit_limit

    def forward(self, states, actions, old_log_probs, returns):
        """(loss, statistics, the policy's evaluation of the rollout). old_log_probs None: the
        policy is the collecting one (PPO's first pass on a rollout not evaluated yet)."""
        evaluation = self.policy.evaluate(states, actions)
        log_probs, values, entropy, _, mean_logits = evaluation
        if old_log_probs is None:
            old_log_probs = log_probs.detach()
        advantages = returns - values.detach()
        ratio = (log_probs - old_log_probs).exp()
        clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
        pg_loss = -torch.min(ratio * advantages, clipped * advantages).mean()
        v_loss = F.mse_loss(values, returns)
        entropy_loss = entropy.mean()
        loss = pg_loss + self.value_coef * v_loss - self.entropy_coef * entropy_loss
        if self.logit_limit is not None:
            beyond = (mean_logits.float().abs() - self.logit_limit).clamp(min=0.0)
            loss = loss + beyond.square().mean()
        stats = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(),
                 "entropy": entropy_loss.detach()}
        return loss, stats, evaluation


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, <= 0 a useless one."""
    variance = returns.var(unbiased=False)
    if variance <= 0:
        return float("nan")
    return float(1 - (returns - values).var(unbiased=False) / variance)


def ppo_update(ppo_loss: nn.Module, optimizer, rollout: Rollout, stage_config, runtime: Runtime,
               guard: NonFiniteGuard, where: str, weight: float = 1.0,
               movement: bool = True) -> dict:
    """ppo_epochs gradient steps on the batch; returns the update's statistics, over every
    process's batch ({} when no process had one).

    A rollout not evaluated yet is evaluated by the first pass (before the first step, so by
    the collecting policy). movement: also measure how far the update moved the policy
    (approx_kl, clip_fraction: one more pass of the policy over the rollout).
    weight 0: a stand-in batch (this process's files were all unreadable): it takes part in
    every collective but adds nothing to the gradients or the statistics."""
    included = weight > 0
    returns = normalise(discounted_returns(rollout.rewards, stage_config.gamma), runtime=runtime,
                        included=included)
    losses: dict = {}
    for _ in range(stage_config.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss, losses, evaluation = ppo_loss(rollout.states, rollout.actions, rollout.log_probs,
                                            returns)
        if rollout.log_probs is None:
            rollout.set_evaluation(evaluation)
        (loss if weight == 1.0 else loss * weight).backward()
        if guard.step_is_finite(step_finite(loss * weight, ppo_loss, runtime), runtime, where):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if rollout.log_probs is None:  # no PPO pass ran (ppo_epochs 0): the statistics need them
        with torch.no_grad():
            rollout.set_evaluation(_unwrapped(ppo_loss).policy.evaluate(rollout.states, rollout.actions))
    moved = _policy_movement(_unwrapped(ppo_loss), rollout) if movement else {}
    return _update_statistics({**losses, **moved}, rollout, returns, runtime, included)


def _unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps it as .module


@torch.no_grad()
def _policy_movement(loss_module: PPOLoss, rollout: Rollout) -> dict:
    """How far the update moved the policy on the rollout's own states and actions."""
    log_probs = loss_module.policy.evaluate(rollout.states, rollout.actions).log_probs
    log_ratio = log_probs - rollout.log_probs
    ratio = log_ratio.exp()
    return {
        # the low-variance estimator of KL(old || new) (CleanRL's approx_kl)
        "approx_kl": ((ratio - 1) - log_ratio).mean(),
        "clip_fraction": ((ratio - 1).abs() > loss_module.clip).float().mean(),
    }


def _update_statistics(means: dict, rollout: Rollout, returns: torch.Tensor, runtime: Runtime,
                       included: bool) -> dict:
    """The logged statistics, over every process's batch: one all-reduce of this process's
    sums (nothing from a stand-in batch)."""
    if not runtime.distributed:
        if not included:
            return {}
        result = {name: float(value) for name, value in means.items()}
        result["explained_variance"] = explained_variance(rollout.values, returns)
        result["reward_focus"] = rollout.rewards.mean(1).tolist()
        result["accuracy"] = (rollout.correct.float().mean(1) * 100).tolist()
        batch = rollout.means.shape[1]
        result.update(_location_statistics(_location_sums(rollout.means).tolist(), batch))
        return result
    names = sorted(means)
    batch = rollout.rewards.shape[1]
    local = torch.cat([
        torch.tensor([float(batch)], device=returns.device, dtype=torch.float64),
        torch.stack([means[name].detach().double() * batch for name in names]),
        rollout.rewards.double().sum(1), rollout.correct.double().sum(1),
        _variance_sums(returns, rollout.values),
        _location_sums(rollout.means),
    ])
    totals = _sum_included(local, runtime, included).tolist()
    count, totals = totals[0], totals[1:]
    if count == 0:
        return {}
    steps = rollout.rewards.shape[0]
    result = {name: value / count for name, value in zip(names, totals)}
    totals = totals[len(names):]
    result["reward_focus"] = [v / count for v in totals[:steps]]
    result["accuracy"] = [v * 100 / count for v in totals[steps:2 * steps + 1]]
    result["explained_variance"] = _explained_from_sums(*totals[2 * steps + 1:2 * steps + 6])
    result.update(_location_statistics(totals[2 * steps + 6:], count))
    return result


EDGE = 0.02
"""A mean location coordinate this close to 0 or 1 is at the image's edge, where the actor's
sigmoid is saturated (slope below 0.02): PPO's updates barely move it any more."""


def _location_sums(means: torch.Tensor) -> torch.Tensor:
    """Sums [sum, sum of squares per (step, coordinate)..., edge count] of mean locations [S, B, 2]
    (float64), from which the batch's location statistics follow, across processes too."""
    means = means.double()
    at_edge = ((means < EDGE) | (means > 1 - EDGE)).sum().double()
    return torch.cat([means.sum(1).flatten(), means.square().sum(1).flatten(), at_edge[None]])


def _location_statistics(sums: list, count: float) -> dict:
    """location_spread: the standard deviation of the policy's mean location over the batch's
    images, averaged over steps and coordinates (0: it looks at the same place in every image);
    edge_share: the share of mean coordinates at the image's edge (see EDGE)."""
    count = max(count, 1.0)
    half = (len(sums) - 1) // 2
    totals, squares = sums[:half], sums[half:2 * half]
    variances = [max(q / count - (t / count) ** 2, 0.0) for t, q in zip(totals, squares)]
    return {"location_spread": sum(v ** 0.5 for v in variances) / max(half, 1),
            "edge_share": sums[-1] / (count * max(half, 1))}


def _variance_sums(returns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sums from which the explained variance of the whole batch follows (float64)."""
    returns, residual = returns.double(), (returns - values).double()
    return torch.stack([returns.sum(), returns.square().sum(), residual.sum(), residual.square().sum(),
                        torch.tensor(float(returns.numel()), dtype=torch.float64, device=returns.device)])


def _explained_from_sums(total, squares, residual, residual_squares, count) -> float:
    count = max(count, 1.0)
    variance = squares / count - (total / count) ** 2
    if variance <= 0:
        return float("nan")
    return 1 - (residual_squares / count - (residual / count) ** 2) / variance
