"""Say why the policy does not learn, instead of letting PPO learn nothing in silence.

The reward of a focus step is the gain in the true class's softmax probability. It is ~0 for
every image when there is nothing left to gain (the glance is already right and certain), when
the probabilities are saturated at 0 or 1 (an overconfident classifier moves by nothing), or when
the encoders were never trained (every step predicts about the same).

A policy can also stop moving with rewards that are not zero: when looking at the image's edge
pays best (early in one-stage training, before the focus encoder can read a patch, a look at
clutter costs probability and an empty corner costs none), its mean locations go there for every
image and its sigmoid saturates, so later updates barely move it.
"""
from __future__ import annotations

from typing import Optional

from .ppo import EDGE, Rollout

ZERO_REWARD = 1e-3
"""Mean |reward| below which the policy gets no signal to learn from."""

STUCK_EDGE_SHARE = 0.25
"""Share of mean location coordinates at the edge (see ppo.EDGE) from which, with the locations
barely differing between images, the policy is stuck there."""
STUCK_SPREAD = 0.05

WARN_EVERY = 100
"""Repeat a reward warning at most this often (in updates) while it persists."""


def explain_rewards(rollout: Rollout, num_classes: int,
                    recipe: str = "three-stage") -> Optional[str]:
    """A warning naming the likely cause when the rollout's rewards carry no signal, else None.
    recipe: the training recipe, whose remedies the warning names."""
    one_stage = recipe == "one-stage"
    step_accuracy = rollout.correct.float().mean(1)
    best_accuracy, glance_accuracy = float(step_accuracy.max()), float(step_accuracy[0])
    chance = 1.0 / num_classes
    if best_accuracy < 1.5 * chance and num_classes > 1:
        remedy = ("Check the data and the learning rates (train.one_stage.backbone_lr, "
                  "classifier_lr)" if one_stage else
                  "Run stage 1 first (--stage 1), or start stage 2 from a trained checkpoint "
                  "with --init")
        return (f"accuracy is at most {best_accuracy:.1%} at every step, about chance "
                f"({chance:.1%}): the encoders and classifier look untrained. {remedy}")
    mean_reward = float(rollout.rewards.abs().mean())
    if mean_reward >= ZERO_REWARD:
        return None
    probs = rollout.true_probs
    saturated = float(((probs > 0.999) | (probs < 0.001)).float().mean())
    prefix = (f"{'policy' if one_stage else 'stage-2'} rewards are ~0 (mean |reward| "
              f"{mean_reward:.1e} per focus step), so the policy cannot learn: ")
    if glance_accuracy > 0.995:
        return prefix + (f"the classifier is already right at the glance on {glance_accuracy:.1%} "
                         "of the batch, with nothing left to gain from looking closer. The "
                         "training images are probably memorised or too easy: train "
                         f"{'' if one_stage else 'stage 1 '}for fewer epochs or on more data, or "
                         "use a smaller patch size")
    if saturated > 0.9:
        return prefix + (f"{saturated:.0%} of the true-class probabilities are saturated (below "
                         "0.001 or above 0.999), so no step can move them. The classifier is "
                         f"overconfident: fewer {'' if one_stage else 'stage-1 '}epochs, a lower "
                         "learning rate or more data")
    return prefix + ("the steps after the glance barely change the prediction. Check that the "
                     f"focus encoder {'learns' if one_stage else 'was trained (stage 1)'} and "
                     "that patches can see the object")


def explain_locations(statistics: dict, rollout: Rollout, section: str,
                      logit_limit: Optional[float]) -> Optional[str]:
    """A warning when the policy's mean locations sit at the image's edge, alike for every
    image (its sigmoid saturated there), else None. statistics: the update's (ppo_update's,
    with edge_share and location_spread); section: the config section of the policy's settings
    ('one_stage' or 'stage2'); logit_limit: the run's policy_logit_limit."""
    edge_share, spread = statistics.get("edge_share"), statistics.get("location_spread")
    if edge_share is None or edge_share < STUCK_EDGE_SHARE or spread >= STUCK_SPREAD:
        return None
    where = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in rollout.means.float().mean(1).tolist())
    remedy = (f"train.{section}.policy_logit_limit={logit_limit:g} keeps its means inside but "
              "the rewards still favour the edge: check that the focus encoder learns"
              if logit_limit is not None else
              f"set train.{section}.policy_logit_limit=3 to keep its means where it can move")
    return (f"the policy looks at the image's edge for every image (mean location per focus "
            f"step {where}; {edge_share:.0%} of its coordinates within {EDGE} of the edge, "
            f"spread {spread:.3f} across images): its sigmoid is saturated there, so PPO's "
            f"updates barely move it. It goes there when looking at nothing pays best, as while "
            f"the focus steps cannot read a patch yet. {remedy}")
