"""Dynamic batching with early exit: requests gathered into batches that run step by step in
one worker thread (onnxruntime's calls release the GIL; the event loop is never blocked), each
image leaving its batch as soon as it is confident, by its own request's thresholds.

Two schedules:
- 'continuous' (default): new requests join at the glance while earlier ones are still at their
  focus steps; a request never waits for a batch it did not start with.
- 'fixed': a batch runs until its last image exits; requests arriving meanwhile form the next.
Either way the first request of an idle server waits up to max_wait for others to join it.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..pool import ExitPool

log = logging.getLogger("glancefocus_runtime.server")

SCHEDULES = ("continuous", "fixed")
_STOP = object()


class BatcherClosedError(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Job:
    """One image waiting for its answer."""

    image: np.ndarray          # [C, H, W] float32, preprocessed
    thresholds: np.ndarray     # [T] float64
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """Runs an ExportedModel's steps on the requests submitted to it.

    on_step(batch_sizes, finished): called in the worker after each round of steps with the
    images each graph call ran and the images that exited (for the metrics).
    """

    def __init__(self, model, max_batch: int = 64, max_wait_s: float = 0.005,
                 schedule: str = "continuous",
                 on_step: Optional[Callable[[list, list], None]] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.model, self.max_batch, self.max_wait_s = model, int(max_batch), float(max_wait_s)
        self.schedule, self.on_step = schedule, on_step
        self.queue: queue.Queue = queue.Queue()
        self.closed = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="glancefocus-batcher", daemon=True)
        self.thread.start()

    def submit(self, image: np.ndarray, thresholds: np.ndarray) -> concurrent.futures.Future:
        """Queue one preprocessed image; its future gets a pool.Finished."""
        job = Job(image, thresholds)
        with self._lock:  # no job may slip in behind the stop mark
            if self.closed:
                raise BatcherClosedError("the server is shutting down")
            self.queue.put(job)
        return job.future

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new jobs, finish the queued and running ones, stop the worker."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.queue.put(_STOP)
        self.thread.join(timeout)

    # ------------------------------------------------------------------------------------------
    # the worker thread

    def _loop(self) -> None:
        pool = ExitPool(self.model)
        stopping = False
        while True:
            idle = len(pool) == 0
            if idle and stopping and self.queue.empty():
                return
            room = self.max_batch - len(pool) if (self.schedule == "continuous" or idle) else 0
            jobs, stop_seen = self._gather(room, wait=idle)
            stopping = stopping or stop_seen
            if jobs:
                pool.add(np.stack([j.image for j in jobs]), np.stack([j.thresholds for j in jobs]),
                         jobs)
            if not len(pool):
                continue
            sizes, in_flight = pool.batch_sizes(), pool.tags()
            try:
                finished = pool.advance()
            except Exception as exc:  # a failing graph call fails its requests, not the server
                log.exception("model step failed")
                for job in in_flight:
                    if not job.future.done():
                        job.future.set_exception(exc)
                pool = ExitPool(self.model)
                continue
            for answer in finished:
                answer.tag.future.set_result(answer)
            if self.on_step is not None:
                self.on_step(sizes, finished)

    def _gather(self, room: int, wait: bool) -> tuple[list, bool]:
        """Up to `room` queued jobs. An idle worker blocks for the first, then waits up to
        max_wait for more; a busy one takes only what is already queued."""
        jobs, stop_seen = [], False
        deadline = None
        while len(jobs) < room:
            try:
                if wait and not jobs:
                    item = self.queue.get(timeout=0.5)   # wakes now and then to check stopping
                elif wait:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    item = self.queue.get(timeout=remaining)
                else:
                    item = self.queue.get_nowait()
            except queue.Empty:
                if wait and not jobs and not stop_seen:
                    return jobs, stop_seen
                break
            if item is _STOP:
                stop_seen = True
                wait = False  # no more waiting: take what is queued and finish
                continue
            if not item.future.set_running_or_notify_cancel():
                continue  # its request gave up (timed out) before it started
            jobs.append(item)
            if deadline is None:
                deadline = time.perf_counter() + self.max_wait_s
        return jobs, stop_seen
