"""Numerical faults: a non-finite loss skips its optimiser step, and too many stop the run.

A skipped step must leave no trace: its gradients are dropped and the BatchNorm running
statistics its forward pass updated are put back, so a NaN batch cannot poison the weights
that the next checkpoint saves.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .runtime import Runtime

log = logging.getLogger("glancefocus.train")


class NonFiniteLossError(ValueError):
    """More non-finite losses than train.max_nonfinite: the run stopped without saving.

    A ValueError so the command reports it in one line, like other problems a user can fix."""


class NonFiniteGuard:
    def __init__(self, limit: int, count: int = 0):
        self.limit = limit
        self.count = count

    def step_is_finite(self, finite: bool, runtime: Runtime, where: str) -> bool:
        """Whether every process's loss was finite; if not, count one skipped step (and stop
        the run past the limit). All processes get the same answer, so they skip together."""
        bad_anywhere = runtime.sum_across_ranks(torch.tensor([0.0 if finite else 1.0]))[0] > 0
        if not bad_anywhere:
            return True
        self.count += 1
        log.warning("non-finite loss at %s: step skipped (%d so far, train.max_nonfinite=%d)",
                    where, self.count, self.limit)
        if self.count > self.limit:
            raise NonFiniteLossError(
                f"{self.count} non-finite losses (train.max_nonfinite={self.limit}); stopping "
                f"without saving at {where}. Try a lower learning rate, train.amp=none, or check "
                "the data for NaN/Inf values")
        return False


def snapshot_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Copies of the module's buffers (BatchNorm running statistics), to undo a skipped step."""
    return [buffer.detach().clone() for buffer in module.buffers()]


def restore_buffers(module: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)
