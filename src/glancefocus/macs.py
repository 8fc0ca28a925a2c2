"""Multiply-add accounting, counted from the modules themselves.

- encoder: every multiply-add of one forward pass at P x P that torch's FlopCounterMode counts
  (convolutions without bias, Linear layers, matrix products, scaled-dot-product attention:
  its FLOPs / 2), plus one per BatchNorm channel (the sum of num_features of the BatchNorm
  layers the pass runs). For CNNs of convolutions and BatchNorm this is the authors' rule, which
  reproduces their released figures to the integer; for other encoders (ConvNeXt's Linear
  MLPs, a ViT's attention) it counts what the authors' convolution-only rule would miss. The
  encoder's own linear head is not counted. An encoder running an operation whose cost is
  neither counted nor negligible (elementwise, reshaping, normalisation, pooling, ...) is
  refused: a count that leaves work out would be too low;
- classifier and policy: the number of weights of their GRU and Linear layers (no biases, no
  critic); the cascaded classifier counts only the Linear of each step, and at step 1 the glance
  encoder's head it uses; a 1x1 convolution in the policy's state encoder counts as a
  convolution (weights x h x w: the authors' ResNet/DenseNet policies have none);
- running k steps costs k * encoder + (k - 1) * policy + the classifier of steps 1..k.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _cpu_attention_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    # FlopCounterMode registers the GPU attention kernels only; the CPU's fused kernel does the
    # same two matrix products, so it gets the same formula (else a ViT's attention counts 0)
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}

NEGLIGIBLE = frozenset({
    # activations (some lack torch's pointwise tag); in-place forms are looked up without "_"
    "relu", "relu6", "leaky_relu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "elu", "sigmoid", "tanh", "softplus", "clamp", "clamp_min", "clamp_max",
    # normalisation, pooling, softmax, resampling: linear in the activations, not counted
    # (BatchNorm is counted by channels, the authors' rule, below)
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "batch_norm", "native_layer_norm", "layer_norm", "native_group_norm", "group_norm",
    # (_safe_softmax: the softmax of attention's math path, which runs off the CPU's and GPU's
    # fused kernels, e.g. on the meta device of the memory estimate)
    "_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax",
    "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "sum", "amax", "amin", "max", "min",
    "var", "var_mean", "std", "std_mean", "linalg_vector_norm", "norm", "cumsum", "argmax",
    "upsample_bilinear2d", "upsample_bicubic2d", "upsample_nearest2d", "_upsample_bicubic2d_aa",
    "_upsample_bilinear2d_aa", "grid_sampler_2d", "affine_grid_generator",
    # moving, indexing and making tensors
    "cat", "stack", "clone", "copy_", "_to_copy", "constant_pad_nd", "reflection_pad2d",
    "replication_pad2d", "roll", "repeat", "index", "index_select", "gather", "embedding",
    "index_put_", "masked_fill", "masked_fill_", "topk", "sort", "flip", "tril", "triu",
    "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "empty_strided",
    "full", "full_like", "arange", "linspace", "fill_", "zero_", "new_zeros", "new_empty",
    "new_ones", "new_full", "new_empty_strided", "scalar_tensor", "lift_fresh", "_local_scalar_dense",
    "native_dropout", "bernoulli", "_unsafe_view", "detach", "as_strided", "resize", "squeeze",
    "unsqueeze", "transpose", "t", "contiguous", "alias",
})


class _UncountedOps(TorchDispatchMode):
    """Records the operations of a pass whose cost is neither counted nor negligible."""

    def __init__(self, counted: dict):
        super().__init__()
        self.counted = counted
        self.uncounted: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if not (packet in self.counted or func.is_view or torch.Tag.pointwise in func.tags
                or packet.__name__.rstrip("_") in NEGLIGIBLE or packet.__name__ in NEGLIGIBLE):
            self.uncounted.add(str(packet))
        return func(*args, **(kwargs or {}))


def count_macs(run: Callable[[], object], net: nn.Module, what: str) -> tuple[int, object]:
    """Multiply-adds of `run()` (a forward pass through `net`, no grad) and its result.

    Counted: FlopCounterMode's operations (FLOPs / 2) plus one per channel of every BatchNorm
    layer that runs (the authors' rule). Raises ValueError naming the operations that are
    neither counted nor negligible."""
    bn_channels = 0

    def on_norm(module: nn.modules.batchnorm._BatchNorm, _inputs, _output):
        nonlocal bn_channels
        bn_channels += module.num_features

    handles = [m.register_forward_hook(on_norm) for m in net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    audit = _UncountedOps(counter.flop_registry)
    try:
        with torch.no_grad(), counter, audit:
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    if audit.uncounted:
        raise ValueError(f"{what}: cannot count its multiply-adds exactly: it runs "
                         f"{', '.join(sorted(audit.uncounted))}, which torch's FlopCounterMode "
                         "does not count (a count without them would be too low)")
    flops = counter.get_total_flops()
    return flops // 2 + bn_channels, result


def encoder_macs(encoder: nn.Module, input_shape: tuple[int, ...], what: str = "encoder") -> int:
    """Multiply-adds of one image through `encoder` (an Encoder: pooled feature and map)."""
    param = next(encoder.parameters())
    zeros = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    return _in_eval(encoder, lambda: count_macs(lambda: encoder(zeros), encoder, what))[0]


def _in_eval(net: nn.Module, run: Callable[[], object]):
    was_training = net.training
    net.eval()
    try:
        return run()
    finally:
        net.train(was_training)


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
    encoder = model.encoder_macs
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
    """A static network on the whole image by the same rule, its linear head included."""
    param = next(backbone.parameters())
    zeros = torch.zeros(1, in_chans, height, width, dtype=param.dtype, device=param.device)
    return _in_eval(backbone, lambda: count_macs(lambda: backbone(zeros), backbone,
                                                 "the static network"))[0]
