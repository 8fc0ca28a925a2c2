"""The one-stage recipe (train.recipe=one-stage): encoders, classifier and patch policy learn
together in one run.

Each training step is stage 1's SGD step on the encoders and the classifier (OneStageLoss: part of
the batch at random locations, the rest at the current policy's); every `ppo_every` steps, one PPO
update of the policy follows on the rollout of those steps' forward passes: the images that
followed the policy, with the paper's reward (the gain of the true class's probability at each
focus step) measured by the classifier as it was at that step. The policy does not change between
its updates, so the joined rollout is one policy's, and PPO's first ratio is exactly 1; an
update on four steps' images costs about 1.6 times one on a single step's (its time is per
operation more than per image), so one every few steps costs less than one per step. The share of random locations falls over the run, from stage 1's random patches towards
stage 3's policy patches. This interleaves the policy's updates with the classifier's, as
AdaptiveNN (Nature Machine Intelligence, 2025) does, instead of training them in separate stages.

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
from .ppo import Episode, PPOLoss, policy_optimizer, ppo_update, rollout_of
from .runtime import Runtime

log = logging.getLogger("glancefocus.train")

class InterleavedPPO:
    """The policy's optimiser and the PPO update that follows every `ppo_every` classifier
    steps (and an epoch's last steps).

    ppo_min_rollout (images, 0: off): an update also waits until the joined episodes hold at
    least that many images, so that a share of followers that is small (early in a run, or
    with a small focus_fraction) still gives PPO a rollout of a useful size; the epoch's last
    update runs with what there is. Under torchrun the count is that of every process's
    images together (one all-reduce of a number per classifier step once ppo_every steps are
    in), so that the processes, whose batches can differ in size when files are unreadable,
    all decide alike and enter the update together."""

    def __init__(self, model, loss: OneStageLoss, settings, runtime: Runtime,
                 guard: NonFiniteGuard):
        self.model, self.loss, self.settings = model, loss, settings
        self.runtime, self.guard = runtime, guard
        self.optimizer = policy_optimizer(model.policy, settings.ppo_lr)
        self.ppo_loss = runtime.wrap(PPOLoss(model.policy, settings.ppo_clip,
                                             settings.value_coef, settings.entropy_coef,
                                             logit_limit=settings.policy_logit_limit))
        self.updates = 0
        self.recorder = None          # ppo.csv, set by the stage loop
        self.warn = False             # reward warnings (not in the first epoch: the encoders are new)
        self._epoch_stats: list[dict] = []
        self._last_warning = -math.inf
        self._steps = 0               # classifier steps since the last update
        self._episodes: list[Episode] = []  # their episodes
        self._images = 0              # the images of those episodes
        self._stand_in: list[Episode] = []  # a stand-in batch's, for when there are no others

    def after_step(self, applied: bool, weight: float) -> None:
        """train_epoch's hook: keep the step's episodes (none when the classifier's step was
        skipped as non-finite: every process skips it together), and update the policy every
        ppo_every steps."""
        episodes = self.loss.take_episodes()
        if not applied:
            return
        if weight:
            self._episodes += episodes
            self._images += sum(len(episode.labels) for episode in episodes)
        else:
            self._stand_in = episodes
        self._steps += 1
        if self._steps >= self.settings.ppo_every and self._rollout_is_large_enough():
            self._update()

    def _rollout_is_large_enough(self) -> bool:
        """Whether the joined episodes hold ppo_min_rollout images (every process's together)."""
        least = self.settings.ppo_min_rollout
        if not least:
            return True
        images = self._images
        if self.runtime.distributed:
            images = int(self.runtime.sum_across_ranks(torch.tensor(float(images))))
        return images >= least

    def finish_epoch(self) -> None:
        """The update on the epoch's last steps, when they were fewer than ppo_every or their
        rollout smaller than ppo_min_rollout."""
        if self._steps:
            self._update()

    def _update(self) -> None:
        # a process whose batches were all stand-ins still takes part in the update, adding nothing
        episodes, weight = (self._episodes, 1.0) if self._episodes else (self._stand_in, 0.0)
        self._steps, self._episodes, self._stand_in, self._images = 0, [], [], 0
        if not episodes:  # no image followed the policy (random_fraction 1): on every process
            return
        rollout = rollout_of(self.model.policy, episodes)
        stats = ppo_update(self.ppo_loss, self.optimizer, rollout, self.settings, self.runtime,
                           self.guard, where=f"one-stage policy update {self.updates + 1}",
                           weight=weight)
        self.updates += 1
        if stats:
            self._epoch_stats.append(stats)
        if self.recorder is not None:
            self.recorder.write(self.updates, stats)
        if weight and self.warn:
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
    return _linear(settings.random_fraction_start, settings.random_fraction_end, epoch,
                   settings.epochs)


def focus_fraction(settings, epoch: int) -> float:
    """The share of a batch that takes the focus steps in `epoch` (0-based): linear from
    focus_fraction in the first epoch to focus_fraction_end (when set) in the last."""
    start, end = settings.focus_fraction, settings.focus_fraction_end
    return _linear(start, start if end is None else end, epoch, settings.epochs)


def _linear(start: float, end: float, epoch: int, epochs: int) -> float:
    if epochs <= 1:
        return start
    return start + (end - start) * epoch / (epochs - 1)
