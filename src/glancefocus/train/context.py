"""What one stage works with, and how it saves and restores its progress."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import save_checkpoint
from ..config import RunConfig, to_dict
from ..interrupts import StopFlag, TrainingInterrupted
from .faults import MicroBatchSize, NonFiniteGuard
from .fit import FitChoice
from .recorder import MetricsRecorder
from .runtime import Runtime, restore_rng
from .state import save_stage_checkpoint, stage_folder, stage_settings, training_state

# Cluttered MNIST draws fresh canvases per data epoch: give every stage its own range of them.
DATA_EPOCHS_PER_STAGE = 1_000_000

STOP_POLL_EVERY = 10
"""Under torchrun the processes compare their stop flags (a collective) every this many batches
(stage 2: updates), not after every one; one process looks at its flag after every batch."""


@dataclass
class StageRun:
    stage: int
    config: RunConfig
    model: object                      # the GlanceFocusNet, on the run's device
    train_set: object
    eval_set: object
    runtime: Runtime
    resume: Optional[dict] = None      # the training state of the last.pt being resumed
    progress: bool = True
    save_every: int = 200              # stage 2: also save last.pt every this many updates
    on_checkpoint: Optional[Callable[[int, dict], None]] = None
    stop_flag: StopFlag = field(default_factory=StopFlag)  # raised by SIGINT / SIGTERM
    micro: MicroBatchSize = field(default_factory=lambda: MicroBatchSize(0))  # shared by stages
    fit: Optional[FitChoice] = None    # the run's memory choice, confirmed by its first steps
    best_metric: float = -math.inf
    guard: NonFiniteGuard = field(init=False)
    _polls: int = field(init=False, default=0)

    def __post_init__(self):
        self.guard = NonFiniteGuard(self.config.train.max_nonfinite)

    @property
    def stage_config(self):
        return stage_settings(self.config.train, self.stage)

    @property
    def folder(self) -> Path:
        return stage_folder(self.config.train.out_dir, self.stage)

    @property
    def seed(self) -> int:
        return self.config.train.seed

    def data_epoch(self, epoch: int) -> int:
        return self.stage * DATA_EPOCHS_PER_STAGE + epoch

    def recorder(self, index_name: str, file_name: str = "metrics.csv") -> MetricsRecorder:
        resume_at = None if self.resume is None else self.resume[index_name]
        return MetricsRecorder(self.folder, self.runtime.is_main, index_name, resume_at, file_name)

    def restore(self, optimizer, scaler=None) -> dict:
        """Put the optimiser, scaler, fault count, best metric and RNGs back as last.pt saved them."""
        state = self.resume
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self.guard.count = state["nonfinite"]
        self.best_metric = state["best_metric"]
        restore_rng(state["rng"])
        return state

    def save(self, optimizer, *, epoch: int, update: int, finished: bool,
             metric: Optional[float] = None, scaler=None) -> None:
        """Write last.pt (and best.pt when `metric` is the best so far); then the hook."""
        is_best = metric is not None and metric > self.best_metric
        if is_best:
            self.best_metric = metric
        training = training_state(self.stage, epoch=epoch, update=update, finished=finished,
                                  optimizer=optimizer, best_metric=self.best_metric,
                                  nonfinite=self.guard.count, scaler=scaler,
                                  world_size=self.runtime.world_size)
        if self.runtime.is_main:
            save_stage_checkpoint(self.model, self.folder, to_dict(self.config), training, is_best)
            # a newer last.pt supersedes the weights saved when an earlier epoch was interrupted
            (self.folder / "interrupted.pt").unlink(missing_ok=True)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.stage, training)

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived in any process (a collective: all stop together)."""
        if not self.runtime.distributed:
            return self.stop_flag.requested
        flag = torch.tensor([1.0 if self.stop_flag.requested else 0.0])
        return bool(self.runtime.sum_across_ranks(flag)[0] > 0)

    def stop_poll(self) -> bool:
        """stop_requested, asked after every batch or update: under torchrun the processes
        compare flags only at every STOP_POLL_EVERY-th call (they all call it at the same
        batches, so they agree), and a stop waits for that batch."""
        self._polls += 1
        if self.runtime.distributed and self._polls % STOP_POLL_EVERY:
            return False
        return self.stop_requested()

    def interrupted(self, weights: Optional[Path] = None) -> TrainingInterrupted:
        """The exception that ends the run after the stop signal's checkpoint was written."""
        signum = self.stop_flag.signum or 15  # another process got the signal: say SIGTERM
        return TrainingInterrupted(signum, self.folder / "last.pt", weights)

    def save_interrupted(self, epoch: int) -> Path:
        """Stages 1/3 stopped mid-epoch: the current weights in interrupted.pt (atomically).

        Resume stays epoch-granular: last.pt, the end of the last finished epoch, is left alone."""
        path = self.folder / "interrupted.pt"
        if self.runtime.is_main:
            training = {"stage": self.stage, "epoch": epoch, "update": 0, "finished": False,
                        "interrupted": True}
            save_checkpoint(self.model, path, run_config=to_dict(self.config), training=training)
        return path
