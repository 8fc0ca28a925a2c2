"""Fit a run to its device: train.amp=auto and train.micro_batch=auto resolved before the first step.

The AMP mode: bf16 where the device computes it natively; fp16 with a GradScaler on CUDA devices
without native bf16 (T4, V100, P100); float32 elsewhere. The micro-batch: the largest whose
counted memory (memory.py: the saved tensors of two small probe passes, extrapolated) stays
within HEADROOM of the budget, for every kind of step the run takes; activation checkpointing
only when no micro-batch fits without it. The effective batch (train.batch_size) never changes,
so neither do the recipe's learning rates. The budget is train.memory_budget, or the device's
memory (a GPU's total, a CPU machine's RAM).

On CUDA the first real step confirms the choice (its peak is logged), and an out-of-memory error
at any step halves the micro-batch and redoes that step (MicroBatchSize).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..config import RunConfig
from .memory import GB, MemoryCounter, kinds_of
from .runtime import resolve_amp

log = logging.getLogger("glancefocus.train")

HEADROOM = 0.8
"""The share of the budget an estimate may take: the count leaves out the CUDA context, cuDNN's
workspaces and the allocator's fragmentation."""
AUTO = "auto"
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """'15GB', '16GiB', '800MB' or a number of bytes -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"train.memory_budget must be a size such as 15GB, 16GiB or 800MB, "
                             f"got {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"train.memory_budget must be > 0, got {text!r}")
    return value


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of `device`: a GPU's total memory, else the machine's RAM."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"{torch.cuda.get_device_name(device)}'s {total / GB:.1f} GB"
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * page_size, f"the machine's {pages * page_size / GB:.1f} GB of RAM"


# ----------------------------------------------------------------------------------------------
# the micro-batch

@dataclass
class FitChoice:
    amp: str
    micro_batch: int
    activation_checkpointing: bool
    budget: int                  # bytes
    budget_source: str
    estimate: dict               # kind -> estimated bytes of its step at the choice
    fits: bool
    amp_reason: str = ""

    @property
    def largest_estimate(self) -> int:
        return max(self.estimate.values())

    def line(self, device, batch: int, world_size: int = 1) -> str:
        """The log line: what was picked, and why."""
        per_process = "" if world_size == 1 else f" per process ({world_size} processes)"
        estimates = ", ".join(f"stage {k}: {v / GB:.2f} GB" if k != "one-stage"
                              else f"one-stage: {v / GB:.2f} GB" for k, v in self.estimate.items())
        verdict = (f"within {HEADROOM:.0%} of the budget" if self.fits else
                   f"ABOVE {HEADROOM:.0%} of the budget even with the smallest choice")
        return (f"memory: {device}, budget {self.budget / GB:.1f} GB ({self.budget_source}); "
                f"amp {self.amp} ({self.amp_reason}), micro-batch {self.micro_batch} of "
                f"{batch}{per_process}, activation checkpointing "
                f"{'on' if self.activation_checkpointing else 'off'}; estimated {estimates}: "
                f"{verdict}")


def candidate_micro_batches(batch: int) -> list[int]:
    """The divisors of `batch`, largest first: every forward pass of a step the same size."""
    return [m for m in range(batch, 0, -1) if batch % m == 0]


def choose_micro_batch(counter: MemoryCounter, kinds: Sequence[str], batch: int, amp: str,
                       budget: int, requested_micro, checkpointing: bool) -> tuple[int, bool, dict, bool]:
    """(micro-batch, checkpointing, estimate per kind, fits): the largest micro-batch whose
    estimate stays within HEADROOM x budget for every kind; checkpointing only when none fits
    without it (or when asked for). A micro-batch asked for is kept and only estimated."""
    limit = HEADROOM * budget

    def estimate(micro, ckpt):
        return {kind: counter.estimate(kind, batch, micro, amp, ckpt)["estimated_bytes"]
                for kind in kinds}

    if requested_micro != AUTO:
        micro = requested_micro or batch
        found = estimate(micro, checkpointing)
        return micro, checkpointing, found, max(found.values()) <= limit
    for ckpt in ([checkpointing] if checkpointing else [False, True]):
        for micro in candidate_micro_batches(batch):
            found = estimate(micro, ckpt)
            if max(found.values()) <= limit:
                return micro, ckpt, found, True
    return 1, True, estimate(1, True), False


def fit_to_device(config: RunConfig, device, world_size: int = 1,
                  stages: Optional[Sequence[int]] = None) -> tuple[RunConfig, FitChoice]:
    """`config` with train.amp and train.micro_batch resolved (no 'auto' left) for `device`,
    and the choice with its estimate (counted on a model of config.model, see memory.py)."""
    device = torch.device(device)
    train = config.train
    amp, amp_reason, _ = resolve_amp(train.amp, device)
    if train.memory_budget is not None:
        budget, source = parse_bytes(train.memory_budget), "train.memory_budget"
    else:
        budget, source = device_memory(device)
    if train.batch_size % world_size:
        raise ValueError(f"train.batch_size={train.batch_size} must be divisible by the number "
                         f"of processes ({world_size})")
    batch = train.batch_size // world_size
    counter = MemoryCounter(config, device)
    micro, ckpt, estimate, fits = choose_micro_batch(
        counter, kinds_of(train.recipe, stages), batch, amp, budget, train.micro_batch,
        train.activation_checkpointing)
    choice = FitChoice(amp, micro, ckpt, budget, source, estimate, fits, amp_reason)
    resolved = dataclasses.replace(train, amp=amp, micro_batch=micro,
                                   activation_checkpointing=ckpt)
    return dataclasses.replace(config, train=resolved), choice


def needs_fitting(config: RunConfig) -> bool:
    return AUTO in (config.train.amp, config.train.micro_batch)


def agree_across_ranks(choice: FitChoice, config: RunConfig, runtime) -> RunConfig:
    """Under torchrun every process takes the smallest micro-batch any of them chose (and
    checkpointing when any chose it): their steps must match."""
    if not runtime.distributed:
        return config
    import torch.distributed as dist

    values = torch.tensor([-choice.micro_batch, int(choice.activation_checkpointing)],
                          device=runtime.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    choice.micro_batch, choice.activation_checkpointing = -int(values[0]), bool(values[1])
    train = dataclasses.replace(config.train, micro_batch=choice.micro_batch,
                                activation_checkpointing=choice.activation_checkpointing)
    return dataclasses.replace(config, train=train)


def confirm_on_cuda(device: torch.device, choice: Optional[FitChoice], where: str) -> None:
    """After a run's first step on CUDA: log its measured peak beside the estimate."""
    if device.type != "cuda" or choice is None:
        return
    peak = torch.cuda.max_memory_allocated(device)
    log.info("%s: the first step's peak was %.2f GB (estimated %.2f GB, budget %.1f GB)", where,
             peak / GB, choice.largest_estimate / GB, choice.budget / GB)
