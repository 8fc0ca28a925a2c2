"""DataLoaders whose batches depend only on (seed, epoch): a resumed run sees the same batches.

Every process reads its own shard through a DistributedSampler (one shard when not distributed).
Items are (image, label) from image folders or (image, label, box) from cluttered MNIST; batches
come through collate_skip_bad, which drops unreadable files (a batch of only bad files is None:
see StandIn for what a process does with it under torchrun).

Item i of an epoch is drawn with torch's global RNG seeded from (seed, epoch, i) (SeededItems), so
its random crop and flip do not depend on the number of workers, on which worker reads it, on the
process's rank or on where in the epoch a resumed run starts. Processes still see different
augmentations: they read different indices.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    Subset,
    default_collate,
)

from ..data import collate_skip_bad
from .runtime import STREAM_AUGMENT, STREAM_WORKERS, Runtime, derive_seed

AUTO_WORKERS = -1
"""data.num_workers=-1: pick the number of DataLoader workers from the machine."""
MAX_AUTO_WORKERS = 8
_MASK64 = (1 << 64) - 1


def resolve_num_workers(requested: int, device="cpu", local_processes: Optional[int] = None) -> int:
    """data.num_workers as a DataLoader takes it; 0 and more are kept. -1 (auto): with a GPU,
    min(8, usable CPU cores // processes on this machine), so decoding overlaps the device's
    work; on a CPU 0, since the training step already keeps every core busy and a worker
    only competes with it (and costs a start per epoch)."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < AUTO_WORKERS:
        raise ValueError(f"data.num_workers must be >= 0, or -1 to pick it from the machine, "
                         f"got {requested!r}")
    if requested != AUTO_WORKERS:
        return requested
    if torch.device(device).type == "cpu":
        return 0
    if local_processes is None:  # torchrun names the processes sharing this machine
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, usable_cpus() // max(local_processes, 1)))


def usable_cpus() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))  # Linux: honours taskset and cgroup limits
    except AttributeError:
        return os.cpu_count() or 1


def _splitmix64(x: int) -> int:
    """A cheap, well-mixed 64-bit hash (SplitMix64's finaliser): one per item read."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SeededItems(Dataset):
    """`dataset` whose item i is read with torch's global CPU RNG seeded from (`seed`, i), then
    put back as it was: its random augmentation is a pure function of (seed, i), wherever and in
    whichever order it is read, and reading it moves no other random stream."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def item_seed(self, index: int) -> int:
        return _splitmix64(self.seed ^ _splitmix64(index)) >> 1

    def __getitem__(self, index: int):
        # the CPU generator only (torch.manual_seed would also reseed the CUDA generators), saved
        # and restored by hand: torch.random.fork_rng costs twice as much per item
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(self.item_seed(index))
        threads = torch.get_num_threads()
        # one thread, as in a DataLoader worker: an item's small tensor operations gain nothing
        # from more, and in the main process of a busy machine waiting for the other threads
        # made them ~100x slower (measured: 300 JPEGs at 10 images/s with 2 threads, 150 with 1)
        torch.set_num_threads(1)
        try:
            return self.dataset[index]
        finally:
            torch.set_num_threads(threads)
            generator.set_state(state)


class SkipFirst(Sampler):
    """The indices of `sampler` after the first `count`: resume in the middle of an epoch."""

    def __init__(self, sampler: Sampler, count: int):
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator[int]:
        for position, index in enumerate(self.sampler):
            if position >= self.count:
                yield index

    def __len__(self) -> int:
        return max(len(self.sampler) - self.count, 0)


def make_loader(dataset, batch_size: int, runtime: Runtime, *, seed: int, epoch: int,
                shuffle: bool, num_workers: int = 0, skip_batches: int = 0) -> DataLoader:
    """This process's batches of `dataset` for `epoch`, `skip_batches` batches in.

    A loader serves one epoch and is then dropped, so its workers are not kept
    (persistent_workers would keep a stale copy of cluttered MNIST's per-epoch canvases)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # cluttered MNIST: fresh canvases, before workers copy it
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    if skip_batches:
        sampler = SkipFirst(sampler, skip_batches * batch_size)
    return DataLoader(
        SeededItems(dataset, derive_seed(seed, STREAM_AUGMENT, epoch)), batch_size=batch_size,
        sampler=sampler, num_workers=resolve_num_workers(num_workers, runtime.device),
        collate_fn=collate_skip_bad, pin_memory=runtime.device.type == "cuda",
        # the workers' own seeds (augmentations are seeded per item, see SeededItems)
        generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_WORKERS, epoch, runtime.rank)))


class StandIn:
    """A batch for a process whose whole batch was unreadable (collate_skip_bad gave None).

    Under torchrun every process must enter every collective of a step (the gradient all-reduce
    in backward, PPO's return statistics), or the others wait forever. Such a process runs the
    step on this stand-in with weight 0: it adds nothing to the gradients or the statistics. The
    stand-in is the dataset's first readable item, twice (BatchNorm cannot normalise one value),
    read once when first needed."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.batch = None

    def get(self):
        if self.batch is None:
            item = self._first_readable()
            self.batch = default_collate([item, item])
        return self.batch

    def _first_readable(self):
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if item is not None:
                return item
        raise ValueError("every file of the training set is unreadable")


def first_items(dataset, count: int, name: str):
    """The first `count` items of `dataset` (all of them when count is 0 or covers them)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{name} must be a whole number >= 0 (0: all), got {count!r}")
    if count == 0 or count >= len(dataset):
        return dataset
    return Subset(dataset, range(count))


def batches_per_epoch(dataset_size: int, batch_size: int, runtime: Runtime) -> int:
    """len() of make_loader's loader, without building it (DistributedSampler pads each shard
    to ceil(size / processes))."""
    shard = math.ceil(dataset_size / runtime.world_size)
    return math.ceil(shard / batch_size)


def per_process_batch(batch_size: int, runtime: Runtime) -> int:
    """Each process's share of the effective batch train.batch_size."""
    if batch_size % runtime.world_size:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of "
                         f"processes ({runtime.world_size})")
    return batch_size // runtime.world_size


def check_bad_files(dataset) -> None:
    """Image folders: stop when too many files were unreadable (see data/folders.py)."""
    check = getattr(dataset, "check_bad_fraction", None)
    if check is not None:
        check()


def unpack(batch, runtime: Runtime, channels_last: bool = False):
    """(images, labels, boxes or None) on the run's device."""
    images, labels = batch[0], batch[1]
    boxes: Optional[torch.Tensor] = batch[2] if len(batch) > 2 else None
    images = images.to(runtime.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(runtime.device, non_blocking=True), boxes


def micro_batches(images: torch.Tensor, labels: torch.Tensor, micro_batch: int):
    """Split a batch for gradient accumulation; micro_batch 0 means no split."""
    size = micro_batch if micro_batch > 0 else images.shape[0]
    return list(zip(images.split(size), labels.split(size)))
