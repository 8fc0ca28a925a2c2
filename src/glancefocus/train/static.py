"""The static baseline: the same CNN as the GFNet's encoders, trained on the whole image at full
resolution with stage 1's recipe and number of epochs, on the same training data."""
from __future__ import annotations

import functools
import logging

import torch

from ..encoder import create_backbone
from .batchnorm import recalibrate_batchnorm
from .context import DATA_EPOCHS_PER_STAGE
from .faults import MicroBatchSize, NonFiniteGuard
from .fit import AUTO
from .loaders import make_loader, per_process_batch, unpack
from .optim import set_cosine_lr, sgd
from .runtime import (
    STREAM_GLOBAL,
    STREAM_INIT,
    STREAM_STATIC,
    Runtime,
    derive_seed,
    seed_everything,
)
from .supervised import StaticLoss, train_epoch

log = logging.getLogger("glancefocus.train")


def train_static_baseline(config, train_set, runtime: Runtime, progress: bool = True):
    """A freshly built config.model.arch CNN, trained; returns (backbone, per-epoch metrics)."""
    model_config, stage_config = config.model, config.train.stage1
    seed_everything(derive_seed(config.train.seed, STREAM_INIT, STREAM_STATIC))
    backbone = create_backbone(model_config.arch, num_classes=model_config.num_classes,
                               in_chans=model_config.in_chans, pretrained=model_config.pretrained,
                               pretrained_tag=model_config.pretrained_tag,
                               input_size=config.data.image_size,
                               **model_config.encoder_kwargs).to(runtime.device)
    if config.train.channels_last:
        backbone.to(memory_format=torch.channels_last)
    optimizer = sgd([(list(backbone.parameters()), stage_config.backbone_lr)], stage_config)
    plain_loss = StaticLoss(backbone)
    loss_module = runtime.wrap(plain_loss)
    guard = NonFiniteGuard(config.train.max_nonfinite)
    batch_size = per_process_batch(config.train.batch_size, runtime)
    scaler = runtime.grad_scaler()
    # 'auto' fits the GFNet's step; the static baseline starts with the whole batch and halves
    # it if a step runs out of GPU memory
    micro = MicroBatchSize(0 if config.train.micro_batch == AUTO else config.train.micro_batch)
    history = []
    for epoch in range(stage_config.epochs):
        runtime.seed_process(config.train.seed, STREAM_GLOBAL, STREAM_STATIC, epoch)
        set_cosine_lr(optimizer, epoch, stage_config.epochs, stage_config.warmup_epochs)
        backbone.train()
        # the canvases stage 1 saw in this epoch, in the same order
        batches = functools.partial(make_loader, train_set, batch_size, runtime,
                                    seed=config.train.seed, epoch=DATA_EPOCHS_PER_STAGE + epoch,
                                    shuffle=True, num_workers=config.data.num_workers)
        metrics = train_epoch(loss_module, backbone, batches(), optimizer, runtime, guard, steps=1,
                              micro_batch=micro,
                              channels_last=config.train.channels_last, scaler=scaler,
                              description=f"static baseline epoch {epoch + 1}/{stage_config.epochs}",
                              progress=progress)
        if runtime.is_main:
            log.info("static baseline epoch %d/%d: loss %.4f, train acc %.1f", epoch + 1,
                     stage_config.epochs, metrics["loss"], metrics["train_accuracy"][0])
        history.append(metrics)
    # as stages 1 and 3 do after each epoch (it is evaluated only at the end)
    recalibrate_batchnorm(backbone, plain_loss, batches(), runtime,
                          channels_last=config.train.channels_last)
    runtime.share_buffers(backbone)
    return backbone, history


@torch.no_grad()
def evaluate_static(backbone, dataset, runtime: Runtime, batch_size: int,
                    channels_last: bool = False, num_workers: int = 0) -> float:
    """Top-1 accuracy (percent) of a plain classifier on `dataset`."""
    backbone.eval()
    loader = make_loader(dataset, batch_size, runtime, seed=0, epoch=0, shuffle=False,
                         num_workers=num_workers)
    correct = count = 0
    for batch in loader:
        if batch is None:
            continue
        images, labels, _ = unpack(batch, runtime, channels_last)
        with runtime.autocast():
            correct += int((backbone(images).argmax(-1) == labels).sum())
        count += labels.shape[0]
    totals = runtime.sum_across_ranks(torch.tensor([correct, count]))
    return float(totals[0] * 100 / max(float(totals[1]), 1.0))
