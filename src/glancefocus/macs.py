"""Multiply-add accounting, counted from the modules themselves (the authors' rule, which reproduces their released figures).

- encoder: the multiply-adds of every convolution (no bias) at P x P, plus one per BatchNorm
  channel (the sum of num_features); the encoder's own linear head is not counted;
- classifier and policy: the number of weights of their GRU and Linear layers (no biases, no
  critic); the cascaded classifier counts only the Linear of each step, and at step 1 the glance
  encoder's head it uses; a 1x1 convolution in the policy's state encoder counts as a
  convolution (weights x h x w: the authors' ResNet/DenseNet policies have none);
- running k steps costs k * encoder + (k - 1) * policy + the classifier of steps 1..k.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_macs(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Conv multiply-adds plus BatchNorm channels of one forward pass of `net` on zeros."""
    total = 0

    def on_conv(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def on_norm(module: nn.modules.batchnorm._BatchNorm, _inputs, _output):
        nonlocal total
        total += module.num_features

    handles = []
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(on_norm))
    was_training = net.training
    param = next(net.parameters())
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return int(total)


def count_weights(*modules: nn.Module) -> int:
    """Weights (no biases) of the Linear and GRU layers in `modules`."""
    total = 0
    for root in modules:
        for module in root.modules():
            if isinstance(module, nn.Linear):
                total += module.weight.numel()
            elif isinstance(module, nn.RNNBase):
                total += sum(p.numel() for name, p in module.named_parameters()
                             if name.startswith("weight"))
    return total


def count_policy_macs(policy, state_shape) -> int:
    _, h, w = state_shape
    convs = sum(m.weight.numel() * h * w for m in policy.state_encoder.modules()
                if isinstance(m, nn.Conv2d))
    return convs + count_weights(policy.state_encoder, policy.gru, policy.actor)


def classifier_macs_per_step(model) -> list[int]:
    config, classifier = model.config, model.classifier
    if config.classifier == "recurrent":
        return [count_weights(classifier)] * config.max_steps
    glance_head = count_weights(model.glance_encoder.head)
    return [glance_head] + [count_weights(getattr(classifier, f"fc_{t}"))
                            for t in range(2, config.max_steps + 1)]


def count_model_macs(model) -> dict:
    config = model.config
    encoder = conv_bn_macs(model.glance_encoder, (config.in_chans, config.patch_size, config.patch_size))
    policy = count_policy_macs(model.policy, model.state_shape)
    classifier = classifier_macs_per_step(model)
    per_step = [k * encoder + (k - 1) * policy + sum(classifier[:k])
                for k in range(1, config.max_steps + 1)]
    return {
        "arch": config.arch,
        "patch_size": config.patch_size,
        "max_steps": config.max_steps,
        "num_classes": config.num_classes,
        "encoder": encoder,
        "policy": policy,
        "classifier": classifier[-1],
        "classifier_per_step": classifier,
        "per_step": per_step,
    }


def count_static_macs(backbone: nn.Module, height: int, width: int, in_chans: int) -> int:
    """A static CNN on the whole image by the same rule, plus its linear head."""
    return conv_bn_macs(backbone, (in_chans, height, width)) + count_weights(backbone.get_classifier())
