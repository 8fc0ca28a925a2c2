"""Supervised training (stages 1 and 3, and the static baseline): losses and one epoch.

A loss is an nn.Module whose forward returns (loss, per-step logits [T, B, K]). Under torchrun it
is what DistributedDataParallel wraps, so every gradient it produces is synced.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .faults import NonFiniteGuard, restore_buffers, snapshot_buffers
from .loaders import micro_batches, unpack
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


def train_epoch(loss_module: nn.Module, model: nn.Module, loader, optimizer, runtime: Runtime,
                guard: NonFiniteGuard, *, steps: int, micro_batch: int = 0, channels_last: bool = False,
                scaler=None, generator: Optional[torch.Generator] = None,
                description: str = "", progress: bool = True) -> dict:
    """One pass over `loader`: accumulate micro-batches, step once per batch.

    Returns the mean loss, the training accuracy of each of the `steps` steps (percent) and the
    skipped steps. `model` is the module whose buffers a skipped step restores.
    """
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros(steps, dtype=torch.float64)
    count, skipped_before = 0, guard.count
    bar = tqdm(loader, desc=description, disable=not (progress and runtime.is_main),
               leave=False, dynamic_ncols=True)
    for batch in bar:
        if batch is None:
            continue  # every file of the batch was unreadable
        images, labels, _ = unpack(batch, runtime, channels_last)
        saved = snapshot_buffers(model)
        optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(images, labels, micro_batch)
        batch_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
        batch_correct = torch.zeros(steps, dtype=torch.float64)
        for index, (x, y) in enumerate(parts):
            # gradients are synced across processes once, after the last micro-batch
            last = index == len(parts) - 1
            sync = contextlib.nullcontext() if last or not runtime.distributed else loss_module.no_sync()
            with sync:
                with runtime.autocast():
                    loss, logits = loss_module(x, y, generator)
                share = loss * (x.shape[0] / images.shape[0])  # the mean over the whole batch
                (scaler.scale(share) if scaler is not None else share).backward()
            batch_loss += loss.detach().double() * x.shape[0]
            batch_correct += (logits.argmax(-1) == y).sum(1).cpu()
        if not guard.step_is_finite(bool(torch.isfinite(batch_loss)), runtime, description):
            restore_buffers(model, saved)
            optimizer.zero_grad(set_to_none=True)
            continue
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loss_sum += batch_loss.cpu()
        correct += batch_correct
        count += images.shape[0]
        if not bar.disable:
            bar.set_postfix_str(f"loss {float(loss_sum) / count:.3f} "
                                f"acc {format_steps(correct * 100 / count)}")
    bar.close()
    totals = runtime.sum_across_ranks(torch.cat([loss_sum.view(1), correct, torch.tensor([count])]))
    seen = max(float(totals[-1]), 1.0)
    return {"loss": float(totals[0]) / seen,
            "train_accuracy": (totals[1:-1] * 100 / seen).tolist(),
            "skipped_nonfinite": guard.count - skipped_before}


def format_steps(values) -> str:
    """Per-step percentages as '91.2/95.0/96.1'."""
    return "/".join(f"{float(v):.1f}" for v in values)
