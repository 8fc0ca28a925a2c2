"""Anytime accuracy (per step) and patch hit rate of a GFNet on an evaluation set."""
from __future__ import annotations

from typing import Optional

import torch

from .loaders import make_loader, unpack
from .runtime import STREAM_EVAL, Runtime


def hits(boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Whether each patch box [S, B, 4] holds the centre of its target box [B, 4]; boxes are
    (x0, y0, x1, y1) with exclusive ends."""
    cx = (target_boxes[:, 0] + target_boxes[:, 2]) / 2
    cy = (target_boxes[:, 1] + target_boxes[:, 3]) / 2
    boxes = boxes.float()
    return ((boxes[..., 0] <= cx) & (cx < boxes[..., 2])
            & (boxes[..., 1] <= cy) & (cy < boxes[..., 3]))


@torch.no_grad()
def evaluate_anytime(model, dataset, runtime: Runtime, batch_size: int,
                     locations: Optional[str] = None, seed: int = 0, num_workers: int = 0) -> dict:
    """Top-1 accuracy (percent) after each step, and where the dataset has true boxes the hit
    rate of each focus step (share of patches holding the box's centre).

    locations: None for the policy's mean, 'random' for uniform random locations (seeded).
    Under torchrun every process evaluates its shard and the counts are summed (the
    DistributedSampler repeats a few images to give every shard the same size).
    """
    was_training = model.training
    model.eval()
    generator = runtime.generator(seed, STREAM_EVAL) if locations == "random" else None
    loader = make_loader(dataset, batch_size, runtime, seed=seed, epoch=0, shuffle=False,
                         num_workers=num_workers)
    steps = model.config.max_steps
    correct = torch.zeros(steps, dtype=torch.float64)
    hit_count = torch.zeros(max(steps - 1, 0), dtype=torch.float64)
    count = 0
    has_boxes = False
    for batch in loader:
        if batch is None:
            continue
        images, labels, boxes = unpack(batch, runtime)
        with runtime.autocast():
            out = model(images, locations=locations, generator=generator)
        correct += (out.logits.argmax(-1) == labels).sum(1).double().cpu()
        count += labels.shape[0]
        if boxes is not None:
            has_boxes = True
            hit_count += hits(out.boxes[1:].cpu(), boxes).sum(1).double()
    model.train(was_training)
    totals = runtime.sum_across_ranks(torch.cat([correct, hit_count, torch.tensor([count])]))
    count = max(float(totals[-1]), 1.0)
    result = {"accuracy": (totals[:steps] * 100 / count).tolist()}
    if has_boxes:
        result["hit_rate"] = (totals[steps:-1] / count).tolist()
    return result
