"""The patch proposal network: an actor-critic that picks where to look next.

The state is the last feature map of the previous step. A state encoder, a GRU across focus
steps, then an actor (the mean location in [0, 1]^2, via a sigmoid) and a critic (the value).
Actions are 2-D Gaussians with a fixed standard deviation around the mean, clamped to the image
([0, 1]^2); evaluation uses the mean. PPO scores an action taken by its Gaussian density
('density', the authors' rule), or ('clamped') by the probability of what was taken: a
coordinate clamped to an edge is the whole Gaussian mass beyond that edge, which the density
ignores. Module names follow the authors' checkpoints (state_encoder, gru, actor.0, critic.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.distributions import Normal

ACTION_SCORINGS = ("density", "clamped")
"""How PatchPolicy scores an action taken (model.policy_action_scoring's choices)."""


@dataclass
class PolicyOutput:
    mean: torch.Tensor          # [B, 2] the actor's location in [0, 1]^2
    value: torch.Tensor         # [B] the critic's estimate
    hidden: torch.Tensor        # [1, B, H] the GRU state after this step


class EpisodeEvaluation(NamedTuple):
    log_probs: torch.Tensor     # [S, B] of the given actions
    values: torch.Tensor        # [S, B] the critic's estimates
    entropy: torch.Tensor       # [S, B]
    means: torch.Tensor         # [S, B, 2] the actor's mean locations
    mean_logits: torch.Tensor   # [S, B, 2] the same before the sigmoid


class PatchPolicy(nn.Module):
    def __init__(self, state_channels: int, state_size: tuple[int, int], hidden: int,
                 encoder: str = "linear", std: float = 0.1, action_scoring: str = "density"):
        super().__init__()
        if action_scoring not in ACTION_SCORINGS:
            raise ValueError(f"model.policy_action_scoring must be one of {ACTION_SCORINGS}, "
                             f"got {action_scoring!r}")
        h, w = state_size
        if encoder == "linear":     # the authors' choice for ResNet and DenseNet
            self.state_encoder = nn.Sequential(
                nn.Linear(state_channels * h * w, 2048), nn.ReLU(),
                nn.Linear(2048, hidden), nn.ReLU())
        elif encoder == "conv":     # MobileNet, EfficientNet, RegNet: squeeze channels first
            self.state_encoder = nn.Sequential(
                nn.Conv2d(state_channels, 32, kernel_size=1, bias=False), nn.ReLU(),
                nn.Flatten(), nn.Linear(32 * h * w, hidden), nn.ReLU())
        else:
            raise ValueError(f"model.policy_encoder must be 'linear' or 'conv', got {encoder!r}")
        self.encoder_kind = encoder
        self.gru = nn.GRU(hidden, hidden)
        self.actor = nn.Sequential(nn.Linear(hidden, 2), nn.Sigmoid())
        self.critic = nn.Sequential(nn.Linear(hidden, 1))
        self.std = std
        self.action_scoring = action_scoring

    def _encode(self, state_map: torch.Tensor) -> torch.Tensor:
        if self.encoder_kind == "linear":
            state_map = state_map.flatten(1)
        return self.state_encoder(state_map)

    def forward(self, state_map: torch.Tensor, hidden: Optional[torch.Tensor]) -> PolicyOutput:
        """One step: the state map [B, C, h, w] of the last step and the GRU state (None = zeros)."""
        encoded = self._encode(state_map)
        output, hidden = self.gru(encoded.unsqueeze(0), hidden)
        output = output[0]
        return PolicyOutput(mean=self.actor(output), value=self.critic(output)[:, 0], hidden=hidden)

    def distribution(self, mean: torch.Tensor) -> Normal:
        # independent coordinates with a fixed scale: the authors' diagonal 2-D Gaussian
        return Normal(mean.float(), torch.full_like(mean, self.std, dtype=torch.float32))

    def sample(self, mean: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A location drawn around `mean`, clamped to [0, 1]^2 (what training acts on)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return (mean.detach().float() + self.std * noise).clamp(0.0, 1.0)

    def log_prob(self, mean: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The log-probability [...] of `action` [..., 2] taken around `mean` (see _score)."""
        return self._score(self.distribution(mean), action)

    def _score(self, dist: Normal, action: torch.Tensor) -> torch.Tensor:
        """The one scoring rule of an action taken, summed over its coordinates.

        'density': the Gaussian's log density, as if no coordinate were clamped. 'clamped': a
        coordinate at exactly 0 or 1 was clamped there from anywhere beyond, so it scores the
        Gaussian's mass beyond that edge, log Phi((0 - mean) / std) or log Phi((mean - 1) / std)
        (log_ndtr: finite, with finite gradients, however far the mean is from the edge); the
        interior scores the density as before."""
        action = action.float()
        scores = dist.log_prob(action)
        if self.action_scoring == "clamped":
            mean = dist.loc
            below = torch.special.log_ndtr((0.0 - mean) / self.std)
            above = torch.special.log_ndtr((mean - 1.0) / self.std)
            scores = torch.where(action <= 0.0, below, torch.where(action >= 1.0, above, scores))
        return scores.sum(-1)

    def evaluate(self, state_maps: torch.Tensor, actions: torch.Tensor) -> EpisodeEvaluation:
        """Re-run the policy over a whole episode for PPO.

        state_maps [S, B, C, h, w] (the states that chose the S focus locations), actions
        [S, B, 2].
        """
        steps, batch = state_maps.shape[:2]
        encoded = self._encode(state_maps.flatten(0, 1)).view(steps, batch, -1)
        output, _ = self.gru(encoded)
        linear, sigmoid = self.actor
        mean_logits = linear(output)
        means = sigmoid(mean_logits)
        values = self.critic(output)[..., 0]
        dist = self.distribution(means)
        # the entropy is the Gaussian's under either scoring: a constant for the fixed std
        return EpisodeEvaluation(self._score(dist, actions), values,
                                 dist.entropy().sum(-1), means, mean_logits)
