"""Image folders in torchvision ImageFolder layout: ROOT/train/<class>/*, ROOT/val/<class>/*.

Unreadable files (truncated, corrupt, not an image) must not stop a long run, but they must not
pass silently either. The design, which works the same with DataLoader workers (fork or spawn):

- `ImageFolderDataset.__getitem__` returns None for a file it cannot read and logs a warning with
  the reason. Load with `collate_fn=collate_skip_bad`: it drops the Nones and collates the rest
  (a batch that is entirely bad comes out as None: skip it).
- Every file's status (unseen / read / bad) lives in one shared-memory uint8 tensor, one byte per
  file. Workers write their byte; the main process reads the same memory, so `bad_files`,
  `seen_count` and `check_bad_fraction()` there know about every bad file any worker met,
  deduplicated (a file is one byte however often it is read).
- `check_bad_fraction()` raises BadFilesError, naming the bad files, when bad / seen exceeds
  config.max_bad_fraction; call it after each epoch (or every few hundred batches). As an early
  stop, `__getitem__` itself raises the same error as soon as the bad files outnumber
  max_bad_fraction x the whole dataset: the epoch's share would exceed the limit anyway. Raised in
  a worker, DataLoader re-raises it in the main process.

An image smaller than image_size with data.small_images='error' is a configuration problem, not
a bad file: it raises ImageTooSmallError and stops the run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from glancefocus_runtime.images import IMAGE_EXTENSIONS, ImageReadError, ImageTooSmallError
from glancefocus_runtime.images import load_image as _read_image

from .holdout import select_part

log = logging.getLogger(__name__)

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_UNSEEN, _GOOD, _BAD = 0, 1, 2


class DatasetError(ValueError):
    """The image folder layout is wrong; the message names the path."""


class BadFilesError(DatasetError):
    """Too many unreadable files; the message names them."""


# ----------------------------------------------------------------------------------------------
# reading one image (written once, without torch, in glancefocus_runtime.images)

def load_image(path, channels: int = 3) -> Image.Image:
    """Open any image Pillow reads, fully decoded, as 'RGB' (channels=3) or 'L' (channels=1).

    Transparency is composited onto white (what a viewer shows; dropping alpha would expose
    whatever colour hides under transparent pixels, often black). 16-bit and 32-bit integer
    images are scaled to 8 bits rather than clipped (Pillow's own convert clips at 255). Animated
    files give their first frame. Raises ImageReadError naming the file for anything unreadable.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return _read_image(path, "RGB" if channels == 3 else "L")


# ----------------------------------------------------------------------------------------------
# transforms

class _MinSize:
    """Raise ImageTooSmallError for images whose short side is below `size`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if min(img.size) < self.size:
            raise ImageTooSmallError(f"image of {img.size[0]}x{img.size[1]} px is smaller than "
                                     f"data.image_size={self.size} (data.small_images='error')")
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def build_transforms(config, train: bool, channels: int):
    """PIL image -> normalised float tensor, the authors' ImageNet recipe.

    train: RandomResizedCrop(image_size) + RandomHorizontalFlip; eval: Resize(resize_size) +
    CenterCrop(image_size); then ToTensor + Normalize(mean, std).
    """
    from torchvision import transforms as T

    if config.interpolation not in _INTERPOLATIONS:
        raise ValueError(f"data.interpolation must be one of {', '.join(_INTERPOLATIONS)}, "
                         f"got {config.interpolation!r}")
    interp = T.InterpolationMode(config.interpolation)
    for name in ("mean", "std"):
        values = list(getattr(config, name))
        if len(values) != channels:
            raise ValueError(f"data.{name} has {len(values)} values but the model takes {channels} "
                             f"channel(s)")
    if any(s <= 0 for s in config.std):
        raise ValueError(f"data.std must be positive, got {list(config.std)}")
    if config.image_size <= 0:
        raise ValueError(f"data.image_size must be > 0, got {config.image_size}")
    if config.resize_size < config.image_size:
        raise ValueError(f"data.resize_size ({config.resize_size}) must be >= data.image_size "
                         f"({config.image_size})")
    if config.small_images not in ("resize", "error"):
        raise ValueError(f"data.small_images must be 'resize' or 'error', got {config.small_images!r}")

    steps = [_MinSize(config.image_size)] if config.small_images == "error" else []
    if train:
        steps += [T.RandomResizedCrop(config.image_size, interpolation=interp), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(config.resize_size, interpolation=interp), T.CenterCrop(config.image_size)]
    steps += [T.ToTensor(), T.Normalize(list(config.mean), list(config.std))]
    return T.Compose(steps)


# ----------------------------------------------------------------------------------------------
# the dataset

def collate_skip_bad(batch):
    """default_collate without the None items (unreadable files); None if nothing is left."""
    good = [item for item in batch if item is not None]
    return default_collate(good) if good else None


class ImageFolderDataset(Dataset):
    """ROOT/<split>/<class>/<files>, classes = sorted folder names; items (image tensor, label).

    `classes`: the training classes; when given, this split must have exactly the same ones.
    `part`: 'all' of the split's files, or (a training split) those trained on ('train') or held
    out for calibration ('holdout'), see data.holdout_fraction.
    Files whose names start with '.' (e.g. macOS '._x.jpg') are skipped; class folders are
    searched recursively. See the module docstring for how unreadable files are handled.
    """

    def __init__(self, root, split: str, config, train: bool, channels: int = 3,
                 classes: Optional[Sequence[str]] = None, part: str = "all"):
        self.root, self.split, self.channels = Path(root), split, channels
        self.max_bad_fraction = float(config.max_bad_fraction)
        self.transform = build_transforms(config, train, channels)
        self.classes = _find_classes(self.root, split)
        if classes is not None and list(classes) != self.classes:
            missing = sorted(set(classes) - set(self.classes))
            extra = sorted(set(self.classes) - set(classes))
            raise DatasetError(f"class folders of '{self.root / split}' differ from the training "
                               f"classes: missing {missing or 'none'}, extra {extra or 'none'}")
        self.samples = []  # (path, label), torchvision's name
        for label, name in enumerate(self.classes):
            files = _find_images(self.root / split / name)
            if not files:
                raise DatasetError(f"class folder '{self.root / split / name}' holds no image files "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(f, label) for f in files]
        # data.holdout_fraction: training keeps part "train", calibration may take "holdout"
        self.samples = select_part(self.samples, part, getattr(config, "holdout_fraction", 0.0),
                                   getattr(config, "seed", 0))
        self.targets = [label for _, label in self.samples]
        # one status byte per file in shared memory: DataLoader workers and the main process see
        # the same bytes (see the module docstring)
        self._status = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = load_image(path, self.channels)
        except ImageReadError as exc:
            self._status[index] = _BAD
            log.warning("skipping unreadable image: %s", exc)
            self._raise_if_over_budget()
            return None
        self._status[index] = _GOOD
        try:
            return self.transform(img), label
        except ImageTooSmallError as exc:
            raise ImageTooSmallError(f"'{path}': {exc}") from None

    @property
    def bad_files(self) -> list:
        """Unreadable files met so far (by any worker), in dataset order."""
        return [self.samples[i][0] for i in torch.nonzero(self._status == _BAD).flatten().tolist()]

    @property
    def seen_count(self) -> int:
        """Distinct files read (or tried) so far by any worker."""
        return int((self._status != _UNSEEN).sum())

    def check_bad_fraction(self) -> None:
        """Raise BadFilesError when bad / seen files exceeds config.max_bad_fraction."""
        seen, bad = self.seen_count, self.bad_files
        if seen and len(bad) / seen > self.max_bad_fraction:
            raise BadFilesError(self._bad_message(f"{len(bad)} of {seen} files read so far"))

    def _raise_if_over_budget(self) -> None:
        bad = int((self._status == _BAD).sum())
        if bad > self.max_bad_fraction * len(self.samples):
            raise BadFilesError(self._bad_message(f"{bad} of the {len(self.samples)} files"))

    def _bad_message(self, what: str) -> str:
        bad = self.bad_files
        listed = ", ".join(f"'{p}'" for p in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        return (f"{what} in '{self.root / self.split}' are unreadable, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}: {listed}")


def _find_classes(root: Path, split: str) -> list:
    if not root.is_dir():
        raise DatasetError(f"data.root '{root}' does not exist or is not a folder")
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"split folder '{folder}' does not exist (expected ROOT/train/<class>/ "
                           "and ROOT/val/<class>/)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"split folder '{folder}' holds no class folders")
    return classes


def _find_images(folder: Path) -> list:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # deterministic order of the walk
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return found
