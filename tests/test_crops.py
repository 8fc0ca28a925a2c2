import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glancefocus import crops


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(8, 70), width=st.integers(8, 70), patch=st.integers(1, 8),
    batch=st.integers(1, 4), channels=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
    edges=st.booleans(),
)
def test_crop_equals_slicing_at_the_floor_corner(height, width, patch, batch, channels, seed, edges):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, height, width, generator=gen)
    locations = torch.rand(batch, 2, generator=gen)
    if edges:  # the corners of the unit square are legal locations too
        locations = torch.randint(0, 2, (batch, 2), generator=gen).float()
    patches = crops.crop(images, locations, patch)
    boxes = crops.crop_boxes(locations, height, width, patch)
    assert patches.shape == (batch, channels, patch, patch)
    for i in range(batch):
        a0, a1 = locations[i].numpy().astype(np.float32)
        top = int(np.floor(a0 * np.float32(height - patch)))
        left = int(np.floor(a1 * np.float32(width - patch)))
        expected = images[i, :, top:top + patch, left:left + patch]
        assert torch.equal(patches[i], expected)
        assert boxes[i].tolist() == [left, top, left + patch, top + patch]


def test_crop_rejects_patch_larger_than_image():
    with pytest.raises(ValueError, match="smaller than the patch size"):
        crops.crop(torch.zeros(1, 3, 20, 40), torch.zeros(1, 2), 32)


def test_glance_matches_interpolate_align_corners():
    images = torch.randn(2, 3, 50, 70)
    for mode in ("bilinear", "bicubic"):
        expected = torch.nn.functional.interpolate(images, size=(16, 16), mode=mode, align_corners=True)
        assert torch.equal(crops.glance(images, 16, mode), expected)
    with pytest.raises(ValueError, match="interpolation"):
        crops.glance(images, 16, "area")


def test_crop_keeps_gradient_free_dtype_and_device():
    images = torch.randn(2, 1, 30, 30, dtype=torch.bfloat16)
    out = crops.crop(images, torch.tensor([[0.5, 0.25], [1.0, 0.0]]), 10)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[1], images[1, :, 20:30, 0:10])
