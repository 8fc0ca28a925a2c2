"""Build the training and evaluation datasets a DataConfig describes."""
from __future__ import annotations

from .cluttered_mnist import ClutteredMNIST
from .folders import ImageFolderDataset

DATASETS = ("folder", "cluttered-mnist")


def build_datasets(config, channels: int):
    """Return (train_dataset, eval_dataset, class_names) for config.dataset.

    'folder': ROOT/train (training augmentation) and ROOT/val (evaluation transforms), which must
    hold the same classes. 'cluttered-mnist': fresh training canvases per epoch (call the train
    dataset's set_epoch) and the fixed test canvases for evaluation. With data.holdout_fraction
    the training set leaves out its held-out share (see holdout_dataset).
    """
    if config.dataset == "folder":
        if not config.root:
            raise ValueError("data.root must name the image folder (ROOT/train/<class>/, "
                             "ROOT/val/<class>/) when data.dataset is 'folder'")
        train = ImageFolderDataset(config.root, "train", config, train=True, channels=channels,
                                   part="train")
        evaluation = ImageFolderDataset(config.root, "val", config, train=False, channels=channels,
                                        classes=train.classes)
    elif config.dataset == "cluttered-mnist":
        if config.root:  # e.g. `--preset demo data.root=FOLDER`: the folder would go unread
            raise ValueError(f"data.root is set ('{config.root}') but data.dataset is "
                             "'cluttered-mnist', which draws its own images; add "
                             "data.dataset=folder to train on the folder")
        train = ClutteredMNIST(config, "train", channels=channels)
        evaluation = ClutteredMNIST(config, "test", channels=channels)
    else:
        raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}, got {config.dataset!r}")
    return train, evaluation, list(train.classes)


def holdout_dataset(config, channels: int, classes):
    """The training images held out of training (data.holdout_fraction), with the evaluation
    transforms: what `glancefocus evaluate --calibrate-on heldout` calibrates on."""
    if config.dataset == "cluttered-mnist":
        return ClutteredMNIST(config, "holdout", channels=channels)
    return ImageFolderDataset(config.root, "train", config, train=False, channels=channels,
                              classes=classes, part="holdout")
