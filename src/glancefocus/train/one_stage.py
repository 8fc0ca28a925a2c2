"""The one-stage recipe (train.recipe=one-stage): encoders, classifier and patch policy learn
together in one run.

Each training step is stage 1's SGD step on the encoders and the classifier (OneStageLoss: part of
the batch at random locations, the rest at the current policy's), followed by one PPO update of
the policy on the rollout of that same forward pass: the images that followed the policy, with
the paper's reward (the gain of the true class's probability at each focus step) measured by the
classifier as it is at that moment. The share of random locations falls over the run, from
stage 1's random patches towards stage 3's policy patches. This interleaves the policy's updates
with the classifier's, as AdaptiveNN (Nature Machine Intelligence, 2025) does, instead of
training them in separate stages.

Logged: every policy update in RUN/one-stage/ppo.csv (reward per focus step, approx KL, clip
fraction, explained variance, entropy, accuracy per step of the images that followed the policy,
the spread of its mean locations across images and their share at the image's edge),
and their epoch means in metrics.csv beside the classifier's loss and accuracy.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from .diagnosis import WARN_EVERY, explain_locations, explain_rewards
from .faults import NonFiniteGuard
from .one_stage_loss import OneStageLoss
from .ppo import PPOLoss, ppo_update
from .runtime import Runtime

log = logging.getLogger("glancefocus.train")

class InterleavedPPO:
    """The policy's optimiser and the PPO update that follows every classifier step."""

    def __init__(self, model, loss: OneStageLoss, settings, runtime: Runtime,
                 guard: NonFiniteGuard):
        self.model, self.loss, self.settings = model, loss, settings
        self.runtime, self.guard = runtime, guard
        self.optimizer = torch.optim.Adam(model.policy.parameters(), lr=settings.ppo_lr,
                                          betas=(0.9, 0.999))
        self.ppo_loss = runtime.wrap(PPOLoss(model.policy, settings.ppo_clip,
                                             settings.value_coef, settings.entropy_coef,
                                             logit_limit=settings.policy_logit_limit))
        self.updates = 0
        self.recorder = None          # ppo.csv, set by the stage loop
        self.warn_from_update = 0     # no reward warnings before this (the encoders are new)
        self._epoch_stats: list[dict] = []
        self._last_warning = -math.inf

    def after_step(self, applied: bool, weight: float) -> None:
        """train_epoch's hook: one PPO update on the step's rollout (none when the classifier's
        step was skipped as non-finite: every process skips it together)."""
        rollout = self.loss.take_rollout()
        if not applied or rollout is None:
            return
        stats = ppo_update(self.ppo_loss, self.optimizer, rollout, self.settings, self.runtime,
                           self.guard, where=f"one-stage policy update {self.updates + 1}",
                           weight=weight)
        self.updates += 1
        if stats:
            self._epoch_stats.append(stats)
        if self.recorder is not None:
            self.recorder.write(self.updates, stats)
        if weight and self.updates >= self.warn_from_update:
            self._warn(explain_rewards(rollout, self.model.config.num_classes, recipe="one-stage")
                       or explain_locations(stats, rollout, "one_stage",
                                            self.settings.policy_logit_limit))

    def _warn(self, warning: Optional[str]) -> None:
        if warning and self.runtime.is_main and self.updates - self._last_warning >= WARN_EVERY:
            log.warning("policy update %d: %s", self.updates, warning)
            self._last_warning = self.updates

    def epoch_summary(self) -> dict:
        """The epoch's mean PPO statistics (per-step lists averaged per step), then reset."""
        stats, self._epoch_stats = self._epoch_stats, []
        if not stats:
            return {}
        summary = {}
        for key, first in stats[0].items():
            if isinstance(first, list):
                summary[f"ppo_{key}"] = [_mean([s[key][i] for s in stats]) for i in range(len(first))]
            else:
                summary[f"ppo_{key}"] = _mean([s[key] for s in stats])
        summary["ppo_updates"] = len(stats)
        return summary


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def random_fraction(settings, epoch: int) -> float:
    """The share of a batch at random locations in `epoch` (0-based): linear from
    random_fraction_start in the first epoch to random_fraction_end in the last."""
    if settings.epochs <= 1:
        return settings.random_fraction_start
    progress = epoch / (settings.epochs - 1)
    return (settings.random_fraction_start
            + (settings.random_fraction_end - settings.random_fraction_start) * progress)
