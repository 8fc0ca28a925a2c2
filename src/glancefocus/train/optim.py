"""What trains in each stage, its optimiser and its learning-rate schedule (the authors'
train.py).

Frozen parts get requires_grad=False and stay in eval mode, so neither their weights nor their
BatchNorm running statistics move.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .state import ONE_STAGE


def frozen_parts(model, stage: int, stage_config) -> list[nn.Module]:
    if stage == 2:
        return [model.glance_encoder, model.focus_encoder, model.classifier]
    # stage 1: random locations; stage 3: the fixed stage-2 policy; the one-stage recipe
    # trains the policy too, with PPO
    frozen = [] if stage == ONE_STAGE else [model.policy]
    if not stage_config.train_glance_encoder:
        frozen.append(model.glance_encoder)
    return frozen


def trains_new_glance_head(model, stage: int, stage_config) -> bool:
    """Stages 1 and 3: a frozen glance encoder whose own head is new (another class count,
    random or local weights without a head) still trains that head, which predicts the glance
    of cascaded models and is a deep-supervision head; left untrained, step 1 stays at chance."""
    return (stage != 2 and not stage_config.train_glance_encoder
            and not model.pretrained_glance_head)


def freeze_for_stage(model, stage: int, stage_config) -> None:
    model.requires_grad_(True)
    for part in frozen_parts(model, stage, stage_config):
        part.requires_grad_(False)
    if trains_new_glance_head(model, stage, stage_config):
        model.glance_encoder.head.requires_grad_(True)


def set_train_modes(model, stage: int, stage_config) -> None:
    """Training mode for what trains, eval mode for the frozen parts."""
    model.train()
    for part in frozen_parts(model, stage, stage_config):
        part.eval()
    if trains_new_glance_head(model, stage, stage_config):
        model.glance_encoder.head.train()


def describe_training(model, stage: int, stage_config) -> str:
    """Which parts of the model train in `stage`, and which stay frozen, in one line."""
    if stage == 2:
        return "stage 2 trains: the patch policy (PPO); frozen: both encoders, the classifier"
    trained = ["focus encoder", "classifier"]
    frozen = [] if stage == ONE_STAGE else ["patch policy"]
    if stage_config.train_glance_encoder:
        trained.insert(0, "glance encoder")
    elif trains_new_glance_head(model, stage, stage_config):
        trained.append("the glance encoder's new head (at the classifier's learning rate)")
        frozen.insert(0, "the rest of the glance encoder")
    else:
        frozen.insert(0, "glance encoder (with its pretrained head)")
    if stage == ONE_STAGE:
        trained.append("the patch policy (a PPO update after every step)")
    name = "one-stage recipe" if stage == ONE_STAGE else f"stage {stage}"
    return f"{name} trains: {', '.join(trained)}; frozen: {', '.join(frozen) or 'nothing'}"


class Optimizers:
    """Several optimisers saved and restored as one (the one-stage recipe's SGD and Adam)."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


OPTIMIZERS = ("sgd", "adamw")


def sgd(groups: list[tuple[list[nn.Parameter], float]], stage_config) -> torch.optim.Optimizer:
    """The stage's optimiser over (parameters, base learning rate) groups; frozen parameters
    are left out. stage_config.optimizer 'sgd': Nesterov SGD (the authors'); 'adamw': AdamW,
    its weight decay on weights of 2+ dimensions only (biases and norms are not decayed)."""
    if stage_config.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.<stage>.optimizer must be one of {OPTIMIZERS}, "
                         f"got {stage_config.optimizer!r}")
    param_groups = []
    for params, lr in groups:
        params = [p for p in params if p.requires_grad]
        if stage_config.optimizer == "adamw":
            split = ([p for p in params if p.dim() >= 2], stage_config.weight_decay), \
                    ([p for p in params if p.dim() < 2], 0.0)
            param_groups += [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": decay}
                             for ps, decay in split if ps]
        elif params:
            param_groups.append({"params": params, "lr": lr, "base_lr": lr})
    if stage_config.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=param_groups[0]["lr"], betas=(0.9, 0.999))
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=stage_config.momentum,
                           nesterov=True, weight_decay=stage_config.weight_decay)


def gfnet_sgd(model, stage: int, stage_config) -> torch.optim.SGD:
    """backbone_lr for both encoders (with their own heads), classifier_lr for the classifier
    and for a new head on a frozen glance encoder."""
    heads = []
    if trains_new_glance_head(model, stage, stage_config):
        heads = list(model.glance_encoder.head.parameters())
    in_heads = {id(p) for p in heads}
    encoders = [p for p in list(model.glance_encoder.parameters()) + list(model.focus_encoder.parameters())
                if id(p) not in in_heads]
    return sgd([(encoders, stage_config.backbone_lr),
                (list(model.classifier.parameters()) + heads, stage_config.classifier_lr)],
               stage_config)


def set_cosine_lr(optimizer: torch.optim.Optimizer, epoch: int, epochs: int,
                  warmup_epochs: int = 0) -> None:
    """lr = 0.5 * base * (1 + cos(pi * epoch / epochs)), set at the start of each epoch; with
    a warm-up, (epoch + 1) / warmup_epochs of base in its epochs, then the cosine over the rest."""
    for group in optimizer.param_groups:
        if epoch < warmup_epochs:
            group["lr"] = group["base_lr"] * (epoch + 1) / warmup_epochs
            continue
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
        group["lr"] = 0.5 * group["base_lr"] * (1 + math.cos(math.pi * progress))
