"""Image files to model input with PIL and numpy only: what `glancefocus.create_transform`
(torchvision's Resize + CenterCrop + ToTensor + Normalize) computes, from the manifest's
preprocessing data.

torchvision resizes PIL images with PIL itself, so the same PIL call here gives the same pixels;
ToTensor and Normalize are float32 arithmetic, done in the same order (tested to match).
Files are read here for glancefocus.data.load_image too (transparency onto white, 16-bit
scaled to 8 bits, first frame of animations).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""The file names that folders and globs pick up."""

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

ImageInput = Union[Image.Image, str, Path]


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


class ImageTooSmallError(ValueError):
    """An image is smaller than the input size while small_images is 'error'."""


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than allowed (refused before decoding)."""


def load_image(path: Union[str, Path, BinaryIO], mode: str = "RGB",
               max_pixels: Optional[int] = None, name: Optional[str] = None) -> Image.Image:
    """Open any image Pillow reads (a path or a binary file object), fully decoded, in `mode`
    ('RGB' or 'L').

    max_pixels: refuse (ImageTooLargeError) an image whose header declares more pixels, before
    its pixels are decoded (a small file can declare a huge image). name: what messages call
    the image (default: the path).
    """
    name = name or f"image file '{path}'"
    return decode_image(open_image(path, max_pixels, name), mode, name)


def open_image(path: Union[str, Path, BinaryIO], max_pixels: Optional[int] = None,
               name: Optional[str] = None) -> Image.Image:
    """The first half of load_image: the header read and the size checked, no pixels decoded
    (cheap whatever the file declares); decode_image does the rest."""
    name = name or f"image file '{path}'"
    with _reading(name):
        img = Image.open(path)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            img.close()
            raise ImageTooLargeError(
                f"{name} declares {width} x {height} pixels, more than the limit of "
                f"{max_pixels:,} pixels")
        return img


def decode_image(img: Image.Image, mode: str = "RGB", name: str = "the image") -> Image.Image:
    """The second half of load_image: an image from open_image fully decoded (so that
    truncation is caught here), in `mode`, and its file closed."""
    with _reading(name), img:
        img.load()
        return convert_image(img, mode)


@contextlib.contextmanager
def _reading(name: str):
    """Pillow's errors while reading `name` as ImageReadError (or ImageTooLargeError)."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(f"{name} does not exist") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name} is not an image file Pillow can identify") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own guard, at open (from the header, before decoding)
        raise ImageTooLargeError(f"{name} declares an image too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(f"cannot read {name}: {type(exc).__name__}: {exc}") from None


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """A PIL image in `mode` ('RGB' or 'L'): transparency composited onto white, 16-bit and
    32-bit gray scaled to 8 bits rather than clipped."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit_gray(img)
    elif img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img.convert(mode)


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257.0  # 65535 -> 255
    elif img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif a.size and np.nanmax(a) > 255:
        a = a / 257.0  # 'I' holding 16-bit data
    a = np.nan_to_num(a, nan=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


class Preprocess:
    """PIL image (or path) -> the normalised float32 array [C, H, W] the exported model takes.

    `spec` is the manifest's 'preprocessing' section: mode, resize_size (of the short side),
    image_size (the centre crop), interpolation, mean, std, small_images.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.mode = spec["mode"]
        self.size = int(spec["image_size"])
        self.resize_size = int(spec["resize_size"])
        if spec["interpolation"] not in RESAMPLE:
            raise ValueError(f"manifest preprocessing.interpolation must be one of "
                             f"{', '.join(RESAMPLE)}, got {spec['interpolation']!r}")
        self.resample = RESAMPLE[spec["interpolation"]]
        channels = 3 if self.mode == "RGB" else 1
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(channels, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(channels, 1, 1)

    def load(self, image: ImageInput) -> Image.Image:
        """A path read as the CLI reads it, or a PIL image converted to the model's mode."""
        if isinstance(image, Image.Image):
            return image if image.mode == self.mode else convert_image(image, self.mode)
        return load_image(image, self.mode)

    def __call__(self, image: ImageInput) -> np.ndarray:
        image = self.load(image)
        if self.spec.get("small_images") == "error" and min(image.size) < self.size:
            raise ImageTooSmallError(
                f"image of {image.size[0]}x{image.size[1]} px is smaller than the input size "
                f"{self.size} (the model was exported with small_images='error')")
        geometry = self.geometry(image.size)
        resized = image.resize(geometry.resized_size, self.resample)
        left, top = geometry.left, geometry.top
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(cropped, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        scaled = pixels.astype(np.float32) / np.float32(255)
        return (scaled - self.mean) / self.std

    def geometry(self, original_size) -> "InputGeometry":
        return input_geometry(original_size, self.resize_size, self.size)

    def boxes_to_original(self, boxes, original_size) -> list:
        """Boxes (x0, y0, x1, y1) in the model's input -> pixels of the original (width, height)."""
        return self.geometry(original_size).to_original(boxes)


def input_geometry(original_size, resize_size: int, image_size: int) -> "InputGeometry":
    """Where the model's input lies in an original image of (width, height) pixels, as
    torchvision's Resize(int) + CenterCrop put it there: the short side scaled to resize_size
    (the long side truncated to an integer), the crop's offsets rounded."""
    width, height = original_size
    short, long = sorted((width, height))
    new_short, new_long = resize_size, int(resize_size * long / short)
    resized = (new_short, new_long) if width <= height else (new_long, new_short)
    return InputGeometry((width, height), resized, round((resized[0] - image_size) / 2.0),
                         round((resized[1] - image_size) / 2.0))


class InputGeometry:
    """Where the model's input lies in the original image (see input_geometry)."""

    def __init__(self, original_size: tuple, resized_size: tuple, left: int, top: int):
        self.original_size, self.resized_size = tuple(original_size), tuple(resized_size)
        self.left, self.top = left, top

    def to_original(self, boxes) -> list:
        """Boxes in model-input pixels -> original pixels, rounded and clipped to the image."""
        scale_x = self.original_size[0] / self.resized_size[0]
        scale_y = self.original_size[1] / self.resized_size[1]
        width, height = self.original_size
        mapped = []
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4).tolist():
            mapped.append([_clip(round((x0 + self.left) * scale_x), width),
                           _clip(round((y0 + self.top) * scale_y), height),
                           _clip(round((x1 + self.left) * scale_x), width),
                           _clip(round((y1 + self.top) * scale_y), height)])
        return mapped


def _clip(value: int, limit: int) -> int:
    return min(max(int(value), 0), limit)
