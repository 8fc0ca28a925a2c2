"""One GFNet step as a module with plain tensor inputs and outputs, written with ops that export
to static ONNX graphs (a dynamic batch axis, a fixed image size).

They reuse the model's own submodules (encoders, classifier, policy) and reimplement only the
parts of `GlanceFocusNet.step` that do not trace into clean graphs:

- the glance resize is two matrix products with the interpolation weights that torch's own
  `crops.glance` applies (read off it at export time, so bilinear, bicubic and antialiased
  resizes all come out as the model computes them);
- the focus crop is one gather at the corners floor(a0 * (H - P)), floor(a1 * (W - P)) (rows,
  then columns), computed in float32 as `crops.crop_corners` does.

tests/test_export.py checks both against `model.step`.
"""
from __future__ import annotations

import torch
from torch import nn

STATE_NAMES = ("feature_map", "classifier_state", "policy_hidden")


def resize_matrix(size: int, patch_size: int, interpolation: str, antialias: bool) -> torch.Tensor:
    """[P, size] weights: crops.glance resizes a side of `size` pixels to P as this matrix times it.

    torch resizes rows and columns in two separable passes, so the 2-D glance is
    M_rows @ image @ M_cols^T. The matrix is the glance of the identity image along one side
    (the other side keeps its size, which is the identity), computed in float64.
    """
    identity = torch.eye(size, dtype=torch.float64).view(1, 1, size, size)
    resized = nn.functional.interpolate(identity, size=(patch_size, size), mode=interpolation,
                                        align_corners=True, antialias=antialias)
    return resized[0, 0].float().contiguous()


class GlanceGraph(nn.Module):
    """Step 1: images [B, C, H, W] -> logits, the recurrent state and the box (the whole image)."""

    def __init__(self, model, height: int, width: int):
        super().__init__()
        config = model.config
        self.model = model
        self.height, self.width = height, width
        self.register_buffer("rows", resize_matrix(height, config.patch_size,
                                                   config.glance_interpolation,
                                                   config.glance_antialias))
        self.register_buffer("cols", resize_matrix(width, config.patch_size,
                                                   config.glance_interpolation,
                                                   config.glance_antialias))
        self.policy_hidden = model.policy.gru.hidden_size

    def initial_state(self, pooled: torch.Tensor):
        """A zero GRU state for a recurrent classifier (equal to none; the exporter wants the
        batch size to come from an input), none for a cascaded one."""
        if self.model.config.classifier != "recurrent":
            return None
        hidden = self.model.classifier.rnn.hidden_size
        return pooled.new_zeros((1, pooled.shape[0], hidden))

    def forward(self, images: torch.Tensor):
        model = self.model
        view = images  # crops.glance leaves a P x P image as it is
        if (self.height, self.width) != (model.config.patch_size,) * 2:
            view = torch.matmul(torch.matmul(self.rows, images), self.cols.t())
        encoder = model.glance_encoder
        features = encoder.backbone.forward_features(view)
        pooled = encoder.backbone.forward_head(features, pre_logits=True)
        fmap = encoder.spatial_map(features, view)  # a ViT's tokens as their grid
        batch = images.shape[0]
        logits, classifier_state = model.classifier(pooled, self.initial_state(pooled), 1)
        if model.config.glance_head == "encoder":
            logits = encoder.head(pooled)
        # a zero GRU state equals the policy's 'no state yet' at its first step
        policy_hidden = pooled.new_zeros((1, batch, self.policy_hidden))
        box = torch.tensor([0, 0, self.width, self.height], dtype=torch.long)
        box = box.unsqueeze(0).repeat(batch, 1)
        return logits, fmap, classifier_state, policy_hidden, box


class FocusGraph(nn.Module):
    """Step `step` >= 2: images and the previous step's state -> logits, the next state, the
    policy's location [B, 2] and the box [B, 4] (x0, y0, x1, y1) of the patch looked at."""

    def __init__(self, model, height: int, width: int, step: int):
        super().__init__()
        self.model = model
        self.step = step
        self.height, self.width = height, width
        self.patch_size = model.config.patch_size

    def forward(self, images, feature_map, classifier_state, policy_hidden):
        model, p = self.model, self.patch_size
        policy_out = model.policy(feature_map, policy_hidden)
        location = policy_out.mean.float()
        corners = self.corners(location)
        view = self.crop(images, corners)
        encoder = model.focus_encoder
        features = encoder.backbone.forward_features(view)
        pooled = encoder.backbone.forward_head(features, pre_logits=True)
        fmap = encoder.spatial_map(features, view)  # a ViT's tokens as their grid
        logits, classifier_state = model.classifier(pooled, classifier_state, self.step)
        top, left = corners[:, 0], corners[:, 1]
        box = torch.stack([left, top, left + p, top + p], dim=1)
        return logits, fmap, classifier_state, policy_out.hidden, location, box

    def corners(self, location: torch.Tensor) -> torch.Tensor:
        """Top-left (row, column) [B, 2] long, as crops.crop_corners: floor in float32, clamped."""
        span = torch.tensor([self.height - self.patch_size, self.width - self.patch_size],
                            dtype=torch.float32)
        corners = torch.floor(location * span).long()
        return torch.minimum(corners.clamp(min=0), span.long())

    def crop(self, images: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """P x P patches [B, C, P, P] at `corners`: one gather over the flattened H*W plane."""
        batch, channels = images.shape[0], images.shape[1]
        p, width = self.patch_size, self.width
        offsets = torch.arange(p)
        rows = corners[:, 0:1] + offsets                       # [B, P]
        cols = corners[:, 1:2] + offsets                       # [B, P]
        index = (rows.unsqueeze(2) * width + cols.unsqueeze(1)).reshape(batch, 1, p * p)
        flat = images.reshape(batch, channels, self.height * width)
        patches = flat.gather(2, index.expand(batch, channels, p * p))
        return patches.reshape(batch, channels, p, p)

