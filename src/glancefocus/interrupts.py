"""Ctrl-C (SIGINT) and SIGTERM during training: save a checkpoint, then stop cleanly.

The handlers only set a flag; the stage loops look at it after each batch (stage 2: after each
update; under torchrun every few batches or updates, when all processes compare flags), save,
and raise TrainingInterrupted, which the command turns into one line and the exit status
128 + signal (130 for SIGINT, 143 for SIGTERM). A second signal while saving quits at once:
the atomic writes leave the previous checkpoint whole and remove their temporary file.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; `resume_from` is what --resume continues."""

    def __init__(self, signum: int, resume_from: Optional[Path], weights: Optional[Path] = None):
        self.signum, self.resume_from, self.weights = signum, resume_from, weights
        self.exit_status = 128 + signum
        name = signal.Signals(signum).name
        saved = f"weights saved to '{weights}'; " if weights is not None else ""
        if resume_from is not None and resume_from.exists():
            resume = f"run the same command with --resume to continue from '{resume_from}'"
        else:
            resume = "no finished epoch to resume from yet: run the same command again to restart"
        super().__init__(f"stopped by {name}: {saved}{resume}")


class StopFlag:
    """Which stop signal arrived (None: none yet)."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # a second signal: the user wants out now, not after the save
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Handle SIGINT and SIGTERM with a StopFlag inside the block; the previous handlers after it.

    Python only lets the main thread install handlers: elsewhere the flag never rises."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {signum: signal.signal(signum, flag._handle) for signum in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class UntilStopped:
    """The batches of `loader` until `stop()` is true, checked before fetching the next batch
    (so a stopping run reads nothing more; DataLoader workers may already have exited on Ctrl-C).

    `stop` is asked after every batch; under torchrun, pass one that is cheap between its real
    polls (StageRun.stop_poll), since asking every process is a collective."""

    def __init__(self, loader, stop):
        self.loader, self.stop = loader, stop
        self.dataset = getattr(loader, "dataset", None)  # what a stand-in batch is read from

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            if self.stop():
                return
