"""The one-stage recipe's training step: the classifier's loss and the policy's rollout from one
forward pass.

Every focus step, the current policy proposes a location for each image (a sample around its
mean, computed without gradients), except for a share `random_fraction` of the batch, which looks
at uniform random locations, as stage 1 does: those keep the focus encoder able to read a patch
anywhere, so that the policy's rewards stay informative while it is still learning where to look.
The loss is stage 1's (cross-entropy of every step, plus the encoders' own heads), over the whole
batch, except that the glance's cross-entropy may weigh more than a focus step's
(`glance_weight`): the glance is the step a one-stage run trains for fewer epochs than the
three-stage recipe does, and the one the earliest exits depend on.

The images that followed the policy form its PPO rollout (states, actions, the true class's
probability after every step), collected from the same forward pass: the policy's updates cost no
extra pass through the encoders.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ppo import Rollout, join_rollouts, rollout_of


class OneStageLoss(nn.Module):
    """forward(images, labels, generator) -> (loss, per-step logits [T, B, K]); the rollouts of
    the calls since the last `take_rollout()` are kept until then."""

    def __init__(self, model, dsn_ratio: float, random_fraction: float = 0.5,
                 glance_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.dsn_ratio = dsn_ratio
        self.glance_weight = glance_weight
        self.random_fraction = random_fraction
        self._rollouts: list[Rollout] = []

    def random_count(self, batch: int) -> int:
        """How many images of a batch look at random locations: the first ones (batches are
        shuffled). At least one image follows the policy unless the fraction is 1, so every
        process of a run has a rollout at every step."""
        if self.random_fraction >= 1.0:
            return batch
        return min(int(self.random_fraction * batch), batch - 1)

    def forward(self, images, labels, generator: Optional[torch.Generator] = None):
        model, policy = self.model, self.model.policy
        batch = images.shape[0]
        follows = torch.arange(batch, device=images.device) >= self.random_count(batch)
        out = model.step(images, aux=True)
        ce = self.glance_weight * F.cross_entropy(out.logits.float(), labels)
        dsn = F.cross_entropy(out.aux_logits.float(), labels)
        logits, states, actions = [out.logits], [], []
        for _ in range(1, model.config.max_steps):
            state = out.state
            with torch.no_grad():
                feature_map = state.feature_map.detach().float()
                proposal = policy(feature_map, state.policy_hidden)
                action = policy.sample(proposal.mean, generator)
                uniform = torch.rand(action.shape, generator=generator, device=action.device,
                                     dtype=action.dtype)
                location = torch.where(follows[:, None], action, uniform)
            states.append(feature_map)
            actions.append(action)
            out = model.step(images, dataclasses.replace(state, policy_hidden=proposal.hidden),
                             location=location, aux=True)
            logits.append(out.logits)
            ce = ce + F.cross_entropy(out.logits.float(), labels)
            dsn = dsn + F.cross_entropy(out.aux_logits.float(), labels)
        logits = torch.stack(logits).detach()
        if states and bool(follows.any()):
            self._rollouts.append(rollout_of(policy, torch.stack(states)[:, follows],
                                             torch.stack(actions)[:, follows],
                                             logits[:, follows], labels[follows]))
        steps = len(logits)
        # a weighted mean over the steps, so the weight moves the balance, not the step size
        return ce / (self.glance_weight + steps - 1) + self.dsn_ratio * dsn / steps, logits

    def take_rollout(self) -> Optional[Rollout]:
        """The rollout of the images that followed the policy since the last call (micro-batches
        joined), or None when there were none."""
        parts, self._rollouts = self._rollouts, []
        return join_rollouts(parts) if parts else None
