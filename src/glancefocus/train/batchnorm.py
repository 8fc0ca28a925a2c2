"""Recompute BatchNorm running statistics for the weights a training epoch ends with.

Running statistics are moving averages over the last few dozen batches. When the weights move
fast (a from-scratch encoder at a high learning rate, or inputs that are mostly a constant
background, as cluttered MNIST's are), those averages describe weights that no longer exist:
eval mode then falls far below training mode (measured on the demo: 10% instead of 73% after two
epochs of stage 1). Stage 2 runs the encoders in eval mode, so it depends on these statistics
being right. After each epoch we recompute them as plain averages over a fixed number of
training batches, with the weights frozen ("precise BN").
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from .loaders import unpack
from .runtime import Runtime

BATCHES = 50
"""Training batches averaged over (6,400 images at the demo's batch of 128)."""


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loss_module: nn.Module, loader, runtime: Runtime,
                          generator=None, channels_last: bool = False, batches: int = BATCHES) -> None:
    """Average the statistics of the BatchNorm layers that are in training mode over `batches`
    batches of `loader`, run through `loss_module` exactly as in training (frozen parts, in eval
    mode, keep theirs). `loss_module` must be the plain module, not its DDP wrapper."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative (plain) average
    for batch in itertools.islice(loader, batches):
        if batch is None:
            continue  # no collective runs here: each process averages its own batches
        images, labels, _ = unpack(batch, runtime, channels_last)
        # only the statistics being averaged, not every buffer of the model
        saved = [t.clone() for norm in norms for t in _statistics(norm)]
        with runtime.autocast():
            loss, _ = loss_module(images, labels, generator)
        if not torch.isfinite(loss):  # a batch training skipped must not count here either
            for value, target in zip(saved, (t for norm in norms for t in _statistics(norm))):
                target.copy_(value)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _statistics(norm: nn.Module) -> tuple:
    return norm.running_mean, norm.running_var, norm.num_batches_tracked
