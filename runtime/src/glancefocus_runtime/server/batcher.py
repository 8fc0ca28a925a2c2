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

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..pool import ExitPool

log = logging.getLogger("glancefocus_runtime.server")

SCHEDULES = ("continuous", "fixed")


class BatcherClosedError(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Job:
    """One image waiting for its answer."""

    image: np.ndarray          # [C, H, W] float32, preprocessed
    thresholds: np.ndarray     # [T] float64
    future: asyncio.Future     # of the event loop that submitted it
    loop: asyncio.AbstractEventLoop


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
        # the queue: a deque under one condition, so that the worker takes every queued job in
        # one go (queue.Queue takes a lock and notifies per item)
        self.jobs: collections.deque = collections.deque()
        self.closed = False
        self._changed = threading.Condition()
        self._wake_at = 1  # queued jobs that wake the waiting worker (see _gather)
        self.thread = threading.Thread(target=self._loop, name="glancefocus-batcher", daemon=True)
        self.thread.start()

    def submit(self, image: np.ndarray, thresholds: np.ndarray) -> asyncio.Future:
        """Queue one preprocessed image; call it on an event loop, whose future (returned)
        gets a pool.Finished."""
        loop = asyncio.get_running_loop()
        job = Job(image, thresholds, loop.create_future(), loop)
        with self._changed:
            if self.closed:
                raise BatcherClosedError("the server is shutting down")
            self.jobs.append(job)
            if len(self.jobs) >= self._wake_at:
                self._changed.notify()
        return job.future

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new jobs, finish the queued and running ones, stop the worker."""
        with self._changed:
            self.closed = True
            self._changed.notify()
        self.thread.join(timeout)

    # ------------------------------------------------------------------------------------------
    # the worker thread

    def _loop(self) -> None:
        pool = ExitPool(self.model)
        while True:
            idle = len(pool) == 0
            room = self.max_batch - len(pool) if (self.schedule == "continuous" or idle) else 0
            jobs = self._gather(room, wait=idle)
            if jobs is None:
                return
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
                _answer([(job, exc) for job in in_flight])
                pool = ExitPool(self.model)
                continue
            results = []
            for answer in finished:
                # the answer lets go of its job: future -> answer -> job -> future was a cycle
                # (3 a request) that only the collector freed, holding the job's image till then
                job, answer.tag = answer.tag, None
                results.append((job, answer))
            _answer(results)
            if self.on_step is not None:
                self.on_step(sizes, finished)

    def _gather(self, room: int, wait: bool) -> Optional[list]:
        """Up to `room` queued jobs; None once closed with nothing queued. An idle worker
        blocks for the first, then waits up to max_wait for more; a busy one takes only what
        is already queued."""
        with self._changed:
            if wait:
                while not self.jobs:
                    if self.closed:
                        return None
                    self._changed.wait()
                # woken only when the batch is full, not by every job that joins it
                self._wake_at = room
                deadline = time.perf_counter() + self.max_wait_s
                while len(self.jobs) < room and not self.closed:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                self._wake_at = 1
            jobs = []
            while self.jobs and len(jobs) < room:
                job = self.jobs.popleft()
                if not job.future.done():  # else its request gave up or timed out
                    jobs.append(job)
        return jobs


def _answer(results: list) -> None:
    """[(job, its answer or exception)] -> their futures, with one call into each event loop
    (a call_soon_threadsafe per request, as asyncio.wrap_future makes, costs more CPU and wakes
    the loop once per request)."""
    by_loop: dict = {}
    for job, result in results:
        by_loop.setdefault(job.loop, []).append((job.future, result))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, answers)
        except RuntimeError:  # the loop is closed: nobody waits for these answers
            pass


def _resolve(answers: list) -> None:
    """On the event loop: each future gets its answer, unless its request gave up."""
    for future, result in answers:
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
