"""Supervised training (stages 1 and 3, and the static baseline): losses and one epoch.

A loss is an nn.Module whose forward returns (loss, per-step logits [T, B, K]). Under torchrun it
is what DistributedDataParallel wraps, so every gradient it produces is synced.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .faults import (
    MicroBatchSize,
    NonFiniteGuard,
    reset_nonfinite_batchnorm,
    restore_buffers,
    snapshot_buffers,
    step_finite,
)
from .loaders import StandIn, micro_batches, unpack
from .runtime import Runtime


class GlanceFocusLoss(nn.Module):
    """(sum over steps of CE(classifier) + dsn_ratio * sum over steps of CE(encoder head)) / T.

    Locations are uniform random (stage 1) or sampled from the frozen policy (stage 3).
    """

    def __init__(self, model, dsn_ratio: float, random_locations: bool):
        super().__init__()
        self.model = model
        self.dsn_ratio = dsn_ratio
        self.random_locations = random_locations

    def forward(self, images, labels, generator: Optional[torch.Generator] = None):
        out = self.model(images, locations="random" if self.random_locations else None,
                         sample=True, aux=True, generator=generator)
        steps = out.logits.shape[0]
        # float32 losses whatever the autocast dtype
        ce = sum(F.cross_entropy(out.logits[t].float(), labels) for t in range(steps))
        dsn = sum(F.cross_entropy(out.aux_logits[t].float(), labels) for t in range(steps))
        return (ce + self.dsn_ratio * dsn) / steps, out.logits.detach()


class StaticLoss(nn.Module):
    """A plain CNN classifier on the whole image: the baseline a GFNet has to beat."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images, labels, generator=None):
        logits = self.backbone(images)
        return F.cross_entropy(logits.float(), labels), logits.detach()[None]


LOG_EVERY = 20
"""The progress bar reads the device's running totals every this many batches (a wait for the
device each time), not at every batch."""


def train_epoch(loss_module: nn.Module, model: nn.Module, loader, optimizer, runtime: Runtime,
                guard: NonFiniteGuard, *, steps: int,
                micro_batch: Union[int, MicroBatchSize] = 0, channels_last: bool = False,
                scaler=None, generator: Optional[torch.Generator] = None,
                description: str = "", progress: bool = True,
                after_step: Optional[Callable[[bool, float], None]] = None) -> dict:
    """One pass over `loader`: accumulate micro-batches, step once per batch.

    Returns the mean loss, the training accuracy of each of the `steps` steps (percent) and the
    skipped steps. `model` is the module whose BatchNorm statistics a skipped step resets.
    after_step(applied, weight), when given, runs after every batch's step (applied: False when
    the step was skipped as non-finite; weight 0 for a stand-in batch), e.g. a policy update.
    The running totals stay on the device; a step waits for it only to decide whether its loss
    was finite (see faults.py) and the progress bar every LOG_EVERY batches.
    micro_batch: a MicroBatchSize is halved when a step runs out of GPU memory, and the step
    redone from its start (one process; under torchrun the error stops the run, since the
    other processes wait in the step's collectives); the result's oom_retries counts them.
    """
    if not isinstance(micro_batch, MicroBatchSize):
        micro_batch = MicroBatchSize(micro_batch)
    retries_before = micro_batch.retries
    # loss sum, images, correct per step, images per step (the one-stage recipe may train
    # only the glance of part of a batch)
    totals = runtime.counters(2 + 2 * steps)
    skipped_before = guard.count
    stand_in = StandIn(getattr(loader, "dataset", None))
    bar = tqdm(loader, desc=description, disable=not (progress and runtime.is_main),
               leave=False, dynamic_ncols=True)
    for position, batch in enumerate(bar):
        weight = 1.0
        if batch is None:  # every file of the batch was unreadable
            if not runtime.distributed:
                continue
            batch, weight = stand_in.get(), 0.0  # the others need this process in the step
        images, labels, _ = unpack(batch, runtime, channels_last)
        saved = snapshot_buffers(model) if weight == 0.0 else None
        while True:
            try:
                batch_totals = _train_step(loss_module, images, labels, optimizer, runtime, steps,
                                           micro_batch.size, scaler, generator, weight)
                break
            except torch.cuda.OutOfMemoryError:
                if runtime.distributed:
                    raise
                optimizer.zero_grad(set_to_none=True)  # the step starts again from nothing
                if hasattr(loss_module, "take_episodes"):
                    loss_module.take_episodes()  # the one-stage rollout of the failed attempt
                micro_batch.halve(images.shape[0], f"{description or 'training'} batch "
                                                   f"{position + 1}")
        finite = step_finite(batch_totals[0], loss_module, runtime)
        if saved is not None:
            restore_buffers(model, saved)  # a stand-in must not move the statistics either
        if not guard.step_is_finite(finite, runtime, description):
            optimizer.zero_grad(set_to_none=True)
            reset_nonfinite_batchnorm(model)
            if after_step is not None:
                after_step(False, weight)
            continue
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step is not None:
            after_step(True, weight)
        totals += batch_totals
        if not bar.disable and (position + 1) % LOG_EVERY == 0:
            _show_progress(bar, totals)
    if not bar.disable:
        _show_progress(bar, totals)
    bar.close()
    totals = runtime.sum_across_ranks(totals)
    return {"loss": float(totals[0]) / max(float(totals[1]), 1.0),
            "train_accuracy": _accuracies(totals.tolist(), steps),
            "skipped_nonfinite": guard.count - skipped_before,
            "oom_retries": micro_batch.retries - retries_before}


def _train_step(loss_module, images, labels, optimizer, runtime: Runtime, steps: int,
                micro_batch: int, scaler, generator, weight: float) -> torch.Tensor:
    """Forward and backward of one batch, micro-batch by micro-batch; its totals (loss sum,
    images, correct per step, images per step) on the device, times `weight` (0 for a stand-in
    batch). Logits rows of NaN mark a step an image did not take."""
    optimizer.zero_grad(set_to_none=True)
    parts = micro_batches(images, labels, micro_batch)
    totals = runtime.counters(2 + 2 * steps)
    for index, (x, y) in enumerate(parts):
        # gradients are synced across processes once, after the last micro-batch
        last = index == len(parts) - 1
        sync = contextlib.nullcontext() if last or not runtime.distributed else loss_module.no_sync()
        with sync:
            with runtime.autocast():
                loss, logits = loss_module(x, y, generator)
            share = loss * (x.shape[0] / images.shape[0])  # the mean over the whole batch
            if weight != 1.0:
                share = share * weight
            (scaler.scale(share) if scaler is not None else share).backward()
        totals[0] += loss.detach().to(totals.dtype) * x.shape[0]
        totals[1] += x.shape[0]
        taken = logits[..., 0].isfinite()
        totals[2:2 + steps] += ((logits.argmax(-1) == y) & taken).sum(1).to(totals.dtype)
        totals[2 + steps:] += taken.sum(1).to(totals.dtype)
    return totals * weight if weight != 1.0 else totals


def _show_progress(bar, totals: torch.Tensor) -> None:
    values = totals.tolist()  # the one read of the device's totals
    steps = (len(values) - 2) // 2
    bar.set_postfix_str(f"loss {values[0] / max(values[1], 1.0):.3f} "
                        f"acc {format_steps(_accuracies(values, steps))}")


def _accuracies(values: list, steps: int) -> list:
    """Per-step training accuracy (percent) from the totals' correct and counted images."""
    return [correct * 100 / max(counted, 1.0)
            for correct, counted in zip(values[2:2 + steps], values[2 + steps:])]


def format_steps(values) -> str:
    """Per-step percentages as '91.2/95.0/96.1'."""
    return "/".join(f"{float(v):.1f}" for v in values)
