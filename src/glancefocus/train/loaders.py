"""DataLoaders whose order depends only on (seed, epoch): a resumed run sees the same batches.

Every process reads its own shard through a DistributedSampler (one shard when not distributed).
Items are (image, label) from image folders or (image, label, box) from cluttered MNIST; batches
come through collate_skip_bad, which drops unreadable files (a batch of only bad files is None).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..data import collate_skip_bad
from .runtime import STREAM_WORKERS, Runtime, derive_seed


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
    """This process's batches of `dataset` for `epoch`, `skip_batches` batches in."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # cluttered MNIST: fresh canvases, before workers copy it
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    if skip_batches:
        sampler = SkipFirst(sampler, skip_batches * batch_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_skip_bad, pin_memory=runtime.device.type == "cuda",
        # seeds the workers' random augmentations per epoch
        generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_WORKERS, epoch)))


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
