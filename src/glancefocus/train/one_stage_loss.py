"""The one-stage recipe's training step: the classifier's loss and the policy's rollout from one
forward pass.

Every focus step, the current policy proposes a location for each image (a sample around its
mean, computed without gradients), except for a share `random_fraction` of the batch, which looks
at uniform random locations, as stage 1 does: those keep the focus encoder able to read a patch
anywhere, so that the policy's rewards stay informative while it is still learning where to look.
The loss is stage 1's (cross-entropy of every step, plus the encoders' own heads), except that
the glance's cross-entropy may weigh more than a focus step's (`glance_weight`), and that only a
share of the batch (`focus_fraction`) may take the focus steps while every image takes the
glance. Both serve the glance: it is the step a one-stage run trains for fewer epochs than the
three-stage recipe does, and the one the earliest exits depend on. Its accuracy follows the
passes over the data it gets; the focus steps cost two thirds of a step at T 3, so with focus
steps on half of each batch an epoch costs about a third less, and the same time buys the glance
half as many epochs again. The focusing images are by default those the glance is least sure of
(`focus_on="uncertain"`): the ones early exit sends on at inference, where a look changes the
prediction, so the focus steps learn from the images that need them and the policy's rewards
(the true class's gain in probability) are not spent on images already certain.

The images that followed the policy form its PPO rollout (states, actions, the true class's
probability after every step), collected from the same forward pass: the policy's updates cost no
extra pass through the encoders. That pass is a training one, so the encoders' BatchNorm layers
normalise each focus step with the batch statistics of the focusing sub-batch (of the
micro-batch; followers and random-location images together): the states and rewards of the
rollout are those of training mode, not of the running statistics that stage 2's frozen
encoders (eval mode) use. The steps and their locations are the model's (`model.focus_steps`,
with `explore` marking the images at random locations), the loop that stage 2's rollout and
stages 1 and 3 run too.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .ppo import Episode


class OneStageLoss(nn.Module):
    """forward(images, labels, generator) -> (loss, per-step logits [T, B, K]); the episodes of
    the images that followed the policy in the calls since the last `take_episodes()` are kept
    until then."""

    def __init__(self, model, dsn_ratio: float, random_fraction: float = 0.5,
                 glance_weight: float = 1.0, focus_fraction: float = 1.0,
                 focus_on: str = "uncertain"):
        super().__init__()
        self.model = model
        self.dsn_ratio = dsn_ratio
        self.glance_weight = glance_weight
        self.focus_fraction = focus_fraction
        self.focus_on = focus_on
        self.random_fraction = random_fraction
        self._episodes: list[Episode] = []

    def focus_count(self, batch: int) -> int:
        """How many images of a batch take the focus steps (at least one; which ones:
        `focus_index`)."""
        return max(1, min(batch, round(self.focus_fraction * batch)))

    def random_count(self, batch: int) -> int:
        """How many of `batch` focusing images look at random locations: the first ones
        (batches are shuffled). At least one image follows the policy unless the fraction is 1,
        so every process of a run has a rollout at every step."""
        if self.random_fraction >= 1.0:
            return batch
        return min(int(self.random_fraction * batch), batch - 1)

    def forward(self, images, labels, generator: Optional[torch.Generator] = None):
        model = self.model
        batch = images.shape[0]
        out = model.step(images, aux=True)
        glance_logits, dsn = out.logits, F.cross_entropy(out.aux_logits.float(), labels)
        focused = self.focus_count(batch)
        index = self.focus_index(glance_logits.detach(), focused)
        state = out.state if focused == batch else out.state.select(index)
        images, focus_labels = images[index], labels[index]
        follows = torch.arange(focused, device=images.device) >= self.random_count(focused)
        focus = model.focus_steps(images, state, sample=True, aux=True, generator=generator,
                                  explore=~follows, keep_states=True)
        for aux_logits in focus.aux_logits:
            dsn = dsn + F.cross_entropy(aux_logits.float(), focus_labels)
        logits = [glance_logits[index], *focus.logits]
        # the glance's cross-entropy over the whole batch, the focus steps' over their images
        ce = [F.cross_entropy(glance_logits.float(), labels)]
        ce += [F.cross_entropy(step.float(), focus_labels) for step in logits[1:]]
        logits = torch.stack(logits).detach()
        if len(focus.states) and bool(follows.any()):
            self._episodes.append(Episode(focus.states[:, follows], focus.locations[:, follows],
                                          logits[:, follows], focus_labels[follows]))
        steps = len(logits)
        # a weighted mean over the steps, so the weight moves the balance, not the step size
        weights = [self.glance_weight] + [1.0] * (steps - 1)
        ce = sum(w * loss for w, loss in zip(weights, ce)) / sum(weights)
        padded = _pad_unfocused(glance_logits.detach(), logits, index)
        return ce + self.dsn_ratio * dsn / steps, padded

    def focus_index(self, glance_logits: torch.Tensor, focused: int) -> Union[slice, torch.Tensor]:
        """Which images take the focus steps: the first `focused` (a slice), or ("uncertain")
        the `focused` the glance is least sure of (their indices, ascending)."""
        if focused == glance_logits.shape[0] or self.focus_on == "first":
            return slice(0, focused)
        confidence = glance_logits.float().softmax(-1).amax(-1)
        return confidence.topk(focused, largest=False).indices.sort().values

    def take_episodes(self) -> list[Episode]:
        """The episodes of the images that followed the policy since the last call (one per
        forward pass; none when no image followed it)."""
        episodes, self._episodes = self._episodes, []
        return episodes


def _pad_unfocused(glance_logits: torch.Tensor, logits: torch.Tensor,
                   index: Union[slice, torch.Tensor]) -> torch.Tensor:
    """The per-step logits [T, B, K] of the whole batch: the glance's for every image, NaN at
    the focus steps of the images that did not take them (training accuracy skips those)."""
    if logits.shape[1] == glance_logits.shape[0]:
        return logits
    padded = logits.new_full((logits.shape[0], glance_logits.shape[0], logits.shape[2]),
                             float("nan"))
    padded[0] = glance_logits
    padded[:, index] = logits
    return padded
