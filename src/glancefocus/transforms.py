"""Preprocessing: what a model is fed, defined once from its checkpoint's data config.

    transform = glancefocus.create_transform(model)     # like timm.data.create_transform
    tensor = transform(PIL_image_or_path)                # [C, H, W], normalised
    boxes = transform.boxes_to_original(boxes, image.size)

`glancefocus predict`, `glancefocus evaluate` (image folders) and this API all use
`create_transform`, so a model sees the same tensor whichever way an image reaches it. The
evaluation recipe is the authors' (Resize(resize_size) of the short side, CenterCrop(image_size),
Normalize(mean, std)); cluttered-MNIST models scale a file to the canvas instead (resize_size =
image_size), because their canvases are used whole.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image

# load_image's own mode conversion (transparency onto white, 16-bit scaled), for PIL input
from glancefocus_runtime.images import InputGeometry, input_geometry
from glancefocus_runtime.images import convert_image as convert_image_mode

from .config import DataConfig, from_dict, to_dict
from .data import build_transforms, load_image


def preset_data_section(arch: str) -> dict:
    """The data section of the preset whose model is `arch` (empty if none matches)."""
    from .presets import PRESETS

    for preset in PRESETS.values():
        if preset["model"]["arch"] == arch:
            return dict(preset.get("data", {}))
    return {}


def resolve_data_config(model) -> DataConfig:
    """The data config `model` was trained with: its checkpoint's data section, else its preset's.

    Only the preprocessing fields matter here (`root` is dropped: no folder is needed to
    transform one image).
    """
    run_config = getattr(model, "run_config", None) or {"model": to_dict(model.config)}
    section = dict(run_config.get("data") or preset_data_section(model.config.arch))
    section.pop("root", None)
    return from_dict(DataConfig, section, prefix="data.")


def evaluation_data_config(data: DataConfig) -> DataConfig:
    """`data` as used at evaluation: cluttered-MNIST canvases are scaled whole, no border cut."""
    if data.dataset == "cluttered-mnist":
        return dataclasses.replace(data, resize_size=data.image_size)
    return data


class ImageTransform:
    """PIL image (or image file path) -> the normalised tensor [C, H, W] the model is fed.

    Built by `create_transform`; `data` is the (evaluation) data config it follows.
    """

    def __init__(self, data: DataConfig, channels: int):
        self.data = data
        self.channels = channels
        self.mode = "RGB" if channels == 3 else "L"
        self._pipeline = build_transforms(data, train=False, channels=channels)

    def __call__(self, image: Union[Image.Image, str, Path]) -> torch.Tensor:
        return self._pipeline(self.load(image))

    def load(self, image: Union[Image.Image, str, Path]) -> Image.Image:
        """A path read as the CLI reads it (data.load_image), or a PIL image in the model's mode."""
        if isinstance(image, Image.Image):
            return image if image.mode == self.mode else convert_image_mode(image, self.mode)
        return load_image(image, self.channels)

    def geometry(self, original_size) -> InputGeometry:
        """How an original image of (width, height) pixels becomes the model's input."""
        return input_geometry(original_size, self.data.resize_size, self.data.image_size)

    def boxes_to_original(self, boxes, original_size) -> list:
        """Boxes (x0, y0, x1, y1) in the model's input -> pixels of the original (width, height)."""
        return self.geometry(original_size).to_original(boxes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._pipeline!r})"


def create_transform(model_or_data, channels: Optional[int] = None) -> ImageTransform:
    """The evaluation transform of a model (or of a DataConfig, then give `channels`).

    Exactly what `glancefocus predict` feeds the model: Resize + CenterCrop + Normalize from the
    checkpoint's data config (see the module docstring).
    """
    if isinstance(model_or_data, DataConfig):
        if channels is None:
            raise ValueError("create_transform(DataConfig) needs channels=1 or 3")
        data = model_or_data
    else:
        data = resolve_data_config(model_or_data)
        channels = model_or_data.config.in_chans if channels is None else channels
    return ImageTransform(evaluation_data_config(data), channels)
