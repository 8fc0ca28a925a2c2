"""Stage 2: PPO on the patch policy alone (REFERENCE §2).

One update: the frozen model looks at a batch with locations sampled from the policy (the
rollout); the reward of focus step t is p_t(y) - p_(t-1)(y), the gain in the softmax probability
of the true class; discounted returns are normalised over the batch and steps; then ppo_epochs
gradient steps on the clipped objective, each on the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .faults import NonFiniteGuard
from .runtime import Runtime


@dataclass
class Rollout:
    states: torch.Tensor       # [S, B, C, h, w] the feature maps that chose the S focus locations
    actions: torch.Tensor      # [S, B, 2] the sampled locations
    log_probs: torch.Tensor    # [S, B] their log-probability under the collecting policy
    values: torch.Tensor       # [S, B] the critic's estimates at collection
    true_probs: torch.Tensor   # [T, B] softmax probability of the true class after each step
    correct: torch.Tensor      # [T, B] whether each step's prediction is right

    @property
    def rewards(self) -> torch.Tensor:
        """[S, B]: the gain in the true class's probability of each focus step."""
        return self.true_probs[1:] - self.true_probs[:-1]


@torch.no_grad()
def collect_rollout(model, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime,
                    generator: torch.Generator, micro_batch: int = 0) -> Rollout:
    """Run the frozen model with sampled locations, micro-batch by micro-batch."""
    size = micro_batch if micro_batch > 0 else images.shape[0]
    parts = [_rollout_part(model, x, y, runtime, generator)
             for x, y in zip(images.split(size), labels.split(size))]
    return Rollout(*(torch.cat(tensors, dim=1) for tensors in zip(*(_fields(p) for p in parts))))


def _fields(rollout: Rollout):
    return (rollout.states, rollout.actions, rollout.log_probs, rollout.values,
            rollout.true_probs, rollout.correct)


def _rollout_part(model, images, labels, runtime: Runtime, generator) -> Rollout:
    states, actions, logits = [], [], []
    with runtime.autocast():
        out = model.step(images)
        logits.append(out.logits)
        for _ in range(1, model.config.max_steps):
            states.append(out.state.feature_map.float())
            out = model.step(images, out.state, sample=True, generator=generator)
            actions.append(out.location)
            logits.append(out.logits)
    states, actions = torch.stack(states), torch.stack(actions)
    # the collecting policy's log-probabilities and values, in float32 whatever the autocast
    # dtype, so that PPO's first ratio is exactly 1
    log_probs, values, _ = model.policy.evaluate(states, actions)
    logits = torch.stack(logits).float()
    true_probs = logits.softmax(-1).gather(2, labels.view(1, -1, 1).expand(len(logits), -1, 1))[..., 0]
    return Rollout(states, actions, log_probs, values, true_probs, logits.argmax(-1) == labels)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_(t+1) along the step dimension of rewards [S, B]."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def normalise(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit std over all elements (all-equal values become zeros, not NaN)."""
    return (values - values.mean()) / (values.std(unbiased=False) + eps)


class PPOLoss(nn.Module):
    """The clipped PPO objective of the policy, as a module DistributedDataParallel can wrap."""

    def __init__(self, policy, clip: float, value_coef: float, entropy_coef: float):
        super().__init__()
        self.policy = policy
        self.clip, self.value_coef, self.entropy_coef = clip, value_coef, entropy_coef

    def forward(self, states, actions, old_log_probs, returns):
        log_probs, values, entropy = self.policy.evaluate(states, actions)
        advantages = returns - values.detach()
        log_ratio = log_probs - old_log_probs
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
        pg_loss = -torch.min(ratio * advantages, clipped * advantages).mean()
        v_loss = F.mse_loss(values, returns)
        entropy_loss = entropy.mean()
        loss = pg_loss + self.value_coef * v_loss - self.entropy_coef * entropy_loss
        with torch.no_grad():
            stats = {
                "policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(),
                "entropy": entropy_loss.detach(),
                # the low-variance estimator of KL(old || new) (CleanRL's approx_kl)
                "approx_kl": ((ratio - 1) - log_ratio).mean(),
                "clip_fraction": ((ratio - 1).abs() > self.clip).float().mean(),
            }
        return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, <= 0 a useless one."""
    variance = returns.var(unbiased=False)
    if variance <= 0:
        return float("nan")
    return float(1 - (returns - values).var(unbiased=False) / variance)


def ppo_update(ppo_loss: nn.Module, optimizer, rollout: Rollout, stage_config, runtime: Runtime,
               guard: NonFiniteGuard, where: str) -> dict:
    """ppo_epochs gradient steps on the batch; returns the update's statistics."""
    returns = normalise(discounted_returns(rollout.rewards, stage_config.gamma))
    stats: dict = {}
    for _ in range(stage_config.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = ppo_loss(rollout.states, rollout.actions, rollout.log_probs, returns)
        loss.backward()
        if guard.step_is_finite(bool(torch.isfinite(loss)), runtime, where):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result = {name: float(value) for name, value in stats.items()}
    result["explained_variance"] = explained_variance(rollout.values, returns)
    result["reward"] = rollout.rewards.mean(1).tolist()
    result["accuracy"] = (rollout.correct.float().mean(1) * 100).tolist()
    return result
