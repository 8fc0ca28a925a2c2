"""Numerical faults: a non-finite loss skips its optimiser step, and too many stop the run.

A skipped step must leave no trace in what gets saved: its gradients are dropped, and BatchNorm
running statistics that its forward pass turned non-finite are reset (stages 1 and 3 and the
static baseline recompute every BatchNorm statistic after each epoch anyway, see batchnorm.py).
Nothing is copied ahead of a step that turns out fine.

The decision costs no collective. Under torchrun a process decides from its gradients after
DistributedDataParallel averaged them: a non-finite loss on any process makes the averaged
gradients non-finite on every process, so all of them skip the same step. One process decides
from its loss, as it always did.
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

    def step_is_finite(self, finite, runtime: Runtime, where: str) -> bool:
        """Whether to take the step; if not, count one skipped step (and stop the run past the
        limit). `finite` (a bool or a 0-dim tensor) must come from step_finite so that every
        process gets the same answer and they skip together. Reading it is the step's one wait
        for the device, and no collective."""
        if bool(finite):
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


def step_finite(loss: torch.Tensor, module: nn.Module, runtime: Runtime) -> torch.Tensor:
    """A 0-dim bool tensor on the device: whether the step may be taken. Under torchrun it looks
    at the gradients `module`'s DistributedDataParallel wrapper averaged, the same numbers on
    every process; otherwise at the loss."""
    if not runtime.distributed:
        return torch.isfinite(loss.detach()).all()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.isfinite(loss.detach()).all()
    # one norm over all gradients: inf or NaN as soon as one element is
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch.isfinite(norm)


def reset_nonfinite_batchnorm(module: nn.Module) -> int:
    """After a skipped step: reset the BatchNorm layers whose running statistics are no longer
    finite (their next recomputation fills them in again); returns how many were reset."""
    reset = 0
    for norm in module.modules():
        if _tracks_statistics(norm) and not (torch.isfinite(norm.running_mean).all()
                                             and torch.isfinite(norm.running_var).all()):
            norm.reset_running_stats()
            reset += 1
    return reset


def _tracks_statistics(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats


def snapshot_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Copies of the module's buffers (BatchNorm running statistics), to undo a forward pass
    (only where it is known in advance to be undone, e.g. a stand-in batch's)."""
    return [buffer.detach().clone() for buffer in module.buffers()]


def restore_buffers(module: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)


# ----------------------------------------------------------------------------------------------
# out of memory at a step

class MicroBatchSize:
    """The micro-batch a run uses now: halved when a step runs out of memory (the step is then
    redone), so a run that fit at its start keeps going; `retries` counts the halvings."""

    def __init__(self, size: int):
        self.size = size
        self.retries = 0

    def halve(self, batch: int, where: str) -> None:
        """Halve after an out-of-memory error (raises it again when already at 1 image)."""
        current = self.size if 0 < self.size < batch else batch
        if current <= 1:
            raise torch.cuda.OutOfMemoryError(
                f"{where}: out of memory with a micro-batch of 1 image: the model does not fit "
                "this device (try train.activation_checkpointing=true or train.amp=bf16/fp16)")
        self.size = current // 2
        self.retries += 1
        log.warning("%s: out of memory with a micro-batch of %d images; redoing the step with "
                    "%d (the effective batch stays %d; %d halving(s) so far)", where, current,
                    self.size, batch, self.retries)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
