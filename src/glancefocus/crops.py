"""The two ways a GFNet looks at an image: the glance (whole image resized to P x P) and the
focus (a P x P crop at full resolution). Both are batched tensor operations."""
from __future__ import annotations

import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bilinear", "bicubic")


def glance(images: torch.Tensor, patch_size: int, interpolation: str = "bicubic",
           antialias: bool = False) -> torch.Tensor:
    """Resize whole images [B, C, H, W] to [B, C, P, P] (align_corners=True, as the authors)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"glance interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if images.shape[-2:] == (patch_size, patch_size):
        return images
    low_precision = images.dtype in (torch.bfloat16, torch.float16)
    # resize in float32: some kernels (antialias on CPU) have no bf16/fp16 version
    resized = F.interpolate(images.float() if low_precision else images, size=(patch_size, patch_size),
                            mode=interpolation, align_corners=True, antialias=antialias)
    return resized.to(images.dtype)


def crop_corners(locations: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Top-left corners [B, 2] (row, column) of the crops at `locations` [B, 2] in [0, 1]^2.

    The authors' rule: corner = floor(a * (side - P)); a0 indexes rows, a1 columns. Computed in
    float32 whatever the model's dtype, so bf16 models crop where float32 models do.
    """
    span = torch.tensor([height - patch_size, width - patch_size], dtype=torch.float32,
                        device=locations.device)
    corners = torch.floor(locations.float() * span).long()
    # a location of exactly 1.0 lands on the last valid corner; clamp guards rounding and bad input
    return torch.minimum(corners.clamp_(min=0), span.long())


def crop(images: torch.Tensor, locations: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Full-resolution P x P crops [B, C, P, P] of `images` [B, C, H, W] at `locations` [B, 2].

    The crops keep the images' memory format: channels-last images give channels-last crops
    without a copy of the whole batch (a flattening reshape of them would make one).
    """
    batch, channels, height, width = images.shape
    if height < patch_size or width < patch_size:
        raise ValueError(f"image of {height}x{width} is smaller than the patch size {patch_size}")
    corners = crop_corners(locations, height, width, patch_size)
    offsets = torch.arange(patch_size, device=images.device)
    rows = corners[:, 0, None] + offsets                      # [B, P]
    cols = corners[:, 1, None] + offsets                      # [B, P]
    # one gather over the flattened H*W plane: index = row * W + col for every (row, col) pair
    pixel_index = (rows[:, :, None] * width + cols[:, None, :]).reshape(batch, -1)
    if _is_channels_last(images):
        # memory holds [B, H*W, C]: gather whole pixels, all channels at once
        pixels = images.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        patches = pixels.gather(1, pixel_index[:, :, None].expand(-1, -1, channels))
        return patches.view(batch, patch_size, patch_size, channels).permute(0, 3, 1, 2)
    flat = images.reshape(batch, channels, height * width)
    patches = flat.gather(2, pixel_index[:, None, :].expand(-1, channels, -1))
    return patches.view(batch, channels, patch_size, patch_size)


def _is_channels_last(images: torch.Tensor) -> bool:
    """Stored channels-last (one channel or a 1 x 1 image is both layouts: the plain path)."""
    return not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)


def crop_boxes(locations: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Pixel boxes [B, 4] (x0, y0, x1, y1) of the crops at `locations` (x = column)."""
    corners = crop_corners(locations, height, width, patch_size)
    top, left = corners[:, 0], corners[:, 1]
    return torch.stack([left, top, left + patch_size, top + patch_size], dim=1)
