"""The static baseline: the same network as the GFNet's encoders, trained on the whole image at full
resolution with stage 1's recipe (for train.static_epochs epochs at train.static_batch_size, by
default stage 1's number and the run's batch size), on the same training data; and its file,
static.pt."""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch

from ..atomic import atomic_path
from ..config import DataConfig, ModelConfig, from_dict, to_dict
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
    """A freshly built config.model.arch network, trained; returns (backbone, per-epoch metrics)."""
    model_config, stage_config = config.model, config.train.stage1
    epochs = static_epochs(config)
    seed_everything(derive_seed(config.train.seed, STREAM_INIT, STREAM_STATIC))
    backbone = build_static_backbone(model_config, model_config.num_classes,
                                     config.data.image_size,
                                     pretrained=model_config.pretrained).to(runtime.device)
    if config.train.channels_last:
        backbone.to(memory_format=torch.channels_last)
    optimizer = sgd([(list(backbone.parameters()), stage_config.backbone_lr)], stage_config)
    plain_loss = StaticLoss(backbone)
    loss_module = runtime.wrap(plain_loss)
    guard = NonFiniteGuard(config.train.max_nonfinite)
    batch_size = per_process_batch(static_batch_size(config), runtime)
    scaler = runtime.grad_scaler()
    # 'auto' fits the GFNet's step; the static baseline starts with the whole batch and halves
    # it if a step runs out of GPU memory
    micro = MicroBatchSize(0 if config.train.micro_batch == AUTO else config.train.micro_batch)
    if runtime.is_main:
        log.info("static baseline: %s on the whole %d x %d image, %d epochs at batch %d",
                 model_config.arch, config.data.image_size, config.data.image_size, epochs,
                 static_batch_size(config))
    history = []
    for epoch in range(epochs):
        runtime.seed_process(config.train.seed, STREAM_GLOBAL, STREAM_STATIC, epoch)
        set_cosine_lr(optimizer, epoch, epochs, stage_config.warmup_epochs)
        backbone.train()
        # the canvases stage 1 saw in this epoch, in the same order
        batches = functools.partial(make_loader, train_set, batch_size, runtime,
                                    seed=config.train.seed, epoch=DATA_EPOCHS_PER_STAGE + epoch,
                                    shuffle=True, num_workers=config.data.num_workers)
        metrics = train_epoch(loss_module, backbone, batches(), optimizer, runtime, guard, steps=1,
                              micro_batch=micro,
                              channels_last=config.train.channels_last, scaler=scaler,
                              description=f"static baseline epoch {epoch + 1}/{epochs}",
                              progress=progress)
        if runtime.is_main:
            log.info("static baseline epoch %d/%d: loss %.4f, train acc %.1f", epoch + 1,
                     epochs, metrics["loss"], metrics["train_accuracy"][0])
        history.append(metrics)
    # as stages 1 and 3 do after each epoch (it is evaluated only at the end)
    recalibrate_batchnorm(backbone, plain_loss, batches(), runtime,
                          channels_last=config.train.channels_last)
    runtime.share_buffers(backbone)
    return backbone, history


def build_static_backbone(model_config: ModelConfig, num_classes: int, image_size: int,
                          pretrained=False):
    """The static network: model.arch with a `num_classes` head, set to image_size x image_size
    inputs (a ViT's position embeddings are made for that grid, so a saved one loads only into
    a network built at the same size)."""
    return create_backbone(model_config.arch, num_classes=num_classes,
                           in_chans=model_config.in_chans, pretrained=pretrained,
                           pretrained_tag=model_config.pretrained_tag, input_size=image_size,
                           **model_config.encoder_kwargs)


def static_epochs(config) -> int:
    """train.static_epochs, or stage 1's epochs when it is 0."""
    return _zero_means(config.train.static_epochs, "train.static_epochs", "stage 1's epochs",
                       config.train.stage1.epochs)


def static_batch_size(config) -> int:
    """train.static_batch_size, or train.batch_size when it is 0."""
    return _zero_means(config.train.static_batch_size, "train.static_batch_size",
                       "train.batch_size", config.train.batch_size)


def _zero_means(value, key: str, meaning: str, default: int) -> int:
    """A count >= 0 where 0 stands for `default`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be >= 0 (0: {meaning}), got {value!r}")
    return value or default


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


STATIC_FORMAT = "glancefocus-static"


def save_static_baseline(path, backbone, model_config: ModelConfig, data_config: DataConfig,
                         class_names: Sequence[str]) -> None:
    """Write the trained static network to `path` atomically: a torch.save'd dict of 'format'
    ('glancefocus-static'), 'model_config' and 'data_config' (plain dicts of the configs that
    built and fed it), 'state_dict' (contiguous CPU tensors), 'num_classes' and 'class_names'."""
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    payload = {"format": STATIC_FORMAT, "model_config": to_dict(model_config),
               "data_config": to_dict(data_config), "state_dict": state,
               "num_classes": int(model_config.num_classes), "class_names": list(class_names)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_static_baseline(path):
    """The network save_static_baseline wrote, in eval mode on the CPU; returns (backbone, payload)."""
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"static baseline file '{path}' does not exist") from None
    except Exception as exc:  # truncated files, pickles with code, ...
        raise ValueError(f"cannot read '{path}' as a static baseline file: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != STATIC_FORMAT:
        raise ValueError(f"'{path}' is not a static baseline file (expected a dict with "
                         f"format '{STATIC_FORMAT}', as `glancefocus demo` writes DIR/static.pt)")
    model_config = from_dict(ModelConfig, payload["model_config"], prefix="model.")
    backbone = build_static_backbone(model_config, payload["num_classes"],
                                     int(payload["data_config"]["image_size"]))
    backbone.load_state_dict(payload["state_dict"])
    return backbone.eval(), payload
