"""Encoders for frozen passes with each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, so a convolution followed by one equals
a single convolution with rescaled weights and a bias: one pass over the activations fewer per
layer. Stage 2's rollout runs the frozen encoders five times per image without gradients;
ResNet-50 at P 96 (batch 16, 2 CPU threads, channels-last) takes about 0.8x the time so. The
outputs equal the unfolded ones up to float rounding (about 1e-6 relative).

The pairs are found by tracing the backbone's `forward_features` with torch.fx: a convolution
whose output goes only to a BatchNorm (torch's BatchNorm2d, or timm's BatchNormAct2d, which
then leaves its activation in place). A backbone that does not trace, or has no such pair (a
vision transformer, a DenseNet's BatchNorm-before-convolution), runs as it is.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator, Optional

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger("glancefocus")


class _Features(nn.Module):
    """The backbone's forward_features as a module's forward, for torch.fx to trace."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.forward_features(x)


class _Tracer(fx.Tracer):
    """Keeps every BatchNorm a module call (timm's BatchNormAct2d would be traced into)."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.BatchNorm2d) or super().is_leaf_module(module, name)


def conv_batchnorm_pairs(backbone: nn.Module) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names of `backbone` that can be folded: each module is
    called once, and the convolution's output feeds the BatchNorm alone. [] when the
    backbone does not trace."""
    try:
        graph = _Tracer().trace(_Features(backbone))
    except Exception as exc:  # control flow on values, unsupported ops: then nothing is folded
        log.debug("BatchNorm folding: %s does not trace (%s)", type(backbone).__name__, exc)
        return []
    modules = dict(_Features(backbone).named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_norm(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and type(modules[source.target]) is nn.Conv2d and len(source.users) == 1
                and calls[source.target] == 1 and calls[node.target] == 1
                and modules[node.target].track_running_stats):
            pairs.append((source.target.removeprefix("backbone."),
                          node.target.removeprefix("backbone.")))
    return pairs


def _foldable_norm(module: nn.Module) -> bool:
    """torch's BatchNorm2d itself, or timm's BatchNormAct2d (an activation after it): other
    subclasses may do more in their forward than the affine map folding replaces."""
    if type(module) is nn.BatchNorm2d:
        return True
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return False
    return type(module) is BatchNormAct2d


def fold_batchnorm(backbone: nn.Module) -> Optional[nn.Module]:
    """A copy of `backbone` (in eval mode) with every foldable BatchNorm folded into its
    convolution; None when nothing can be folded."""
    pairs = conv_batchnorm_pairs(backbone)
    if not pairs:
        return None
    folded = copy.deepcopy(backbone).eval()
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        # timm's BatchNormAct2d applies dropout and an activation after the affine map: keep them
        after = (nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") and hasattr(bn, "drop")
                 else nn.Identity())
        folded.set_submodule(conv_name, fused)
        folded.set_submodule(bn_name, after)
    for tensor in folded.parameters():
        tensor.requires_grad_(False)
    return folded


def weights_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `module` is replaced or changed in place
    (an optimiser step, load_state_dict, .to()): a folded copy made for one key is stale
    under another."""
    # the storage object: a tensor replaced, or given new data with `.data =`, has another
    return tuple((t.untyped_storage()._cdata, t._version, t.dtype, t.device)
                 for t in [*module.parameters(), *module.buffers()])


@contextlib.contextmanager
def folded_encoders(*encoders) -> Iterator[None]:
    """Inside, the encoders' eval-mode passes without gradients run their folded copies
    (inference_backbone)."""
    saved = [encoder.fold_batchnorm for encoder in encoders]
    for encoder in encoders:
        encoder.fold_batchnorm = True
    try:
        yield
    finally:
        for encoder, value in zip(encoders, saved):
            encoder.fold_batchnorm = value


def inference_backbone(encoder) -> nn.Module:
    """The backbone an encoder runs: its folded copy where folding is on and applies (eval
    mode, no gradients), else the backbone itself. The copy is made once per set of weights."""
    backbone = encoder.backbone
    if not encoder.fold_batchnorm or encoder.training or torch.is_grad_enabled():
        return backbone
    key = weights_key(backbone)
    cached = encoder._folded
    if cached is None or cached[0] != key:
        folded = fold_batchnorm(backbone)
        if folded is not None and next(folded.parameters()).device.type == "cpu":
            # the rollout's images are channels-last on CPUs (ppo.collect_rollout): weights in
            # the same layout spare oneDNN a reorder per call (ResNet-50 at P 96: 0.95x the time)
            folded = folded.to(memory_format=torch.channels_last)
        cached = (key, folded)
        encoder._folded = cached
    return backbone if cached[1] is None else cached[1]
