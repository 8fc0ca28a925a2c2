"""Datasets: image folders (ImageFolder layout) and cluttered translated MNIST."""
from .build import build_datasets, holdout_dataset
from .cluttered_mnist import ClutteredMNIST, load_mnist_digits, make_canvases
from .folders import (
                      BadFilesError,
                      DatasetError,
                      ImageFolderDataset,
                      ImageReadError,
                      ImageTooSmallError,
                      build_transforms,
                      collate_skip_bad,
                      load_image,
)

__all__ = [
    "build_datasets", "holdout_dataset", "ClutteredMNIST", "load_mnist_digits", "make_canvases",
    "BadFilesError", "DatasetError", "ImageFolderDataset", "ImageReadError", "ImageTooSmallError",
    "build_transforms", "collate_skip_bad", "load_image",
]
