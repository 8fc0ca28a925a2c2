"""Tests of glancefocus.data: cluttered MNIST canvases and image folders."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from glancefocus.config import DataConfig
from glancefocus.data import (
    BadFilesError,
    ClutteredMNIST,
    DatasetError,
    ImageFolderDataset,
    ImageReadError,
    ImageTooSmallError,
    build_datasets,
    build_transforms,
    collate_skip_bad,
    load_image,
    load_mnist_digits,
    make_canvases,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mnist_config(**kw):
    base = dict(dataset="cluttered-mnist", canvas_size=60, num_clutter=4, clutter_size=8,
                train_canvases=64, test_canvases=32, mean=[0.5], std=[0.5], seed=3)
    base.update(kw)
    return DataConfig(**base)


# ----------------------------------------------------------------------------------------------
# cluttered MNIST

def test_mnist_digits_split_is_disjoint_and_balanced():
    train_x, train_y = load_mnist_digits("train")
    test_x, test_y = load_mnist_digits("test")
    assert train_x.shape == (4000, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (1000, 28, 28) and train_y.dtype == torch.int64
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test_y), torch.full((10,), 100))
    train_rows = {bytes(r) for r in train_x.reshape(len(train_x), -1).numpy()}
    assert not any(bytes(r) in train_rows for r in test_x.reshape(len(test_x), -1).numpy())
    assert train_x.float().mean() > 10  # real digits, not an empty array


def test_mnist_digits_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist_digits("validation")
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        load_mnist_digits("train", str(missing))
    with pytest.raises(ValueError, match="mnist_root"):
        load_mnist_digits("train", str(tmp_path))  # exists but holds no MNIST files


def test_canvases_shapes_dtypes_and_boxes():
    digits, labels = load_mnist_digits("test")
    images, out_labels, boxes = make_canvases(digits, labels, 50, 60, 4, 8, _gen())
    assert images.shape == (50, 1, 60, 60) and images.dtype == torch.uint8
    assert out_labels.shape == (50,) and out_labels.dtype == torch.int64
    assert boxes.shape == (50, 4) and boxes.dtype == torch.float32
    assert torch.all(boxes[:, 2:] - boxes[:, :2] == 28)
    assert boxes.min() >= 0 and boxes.max() <= 60
    assert images.max() > 200  # digit strokes are present


def test_digit_lies_in_its_box_and_clutter_never_erases_it():
    digits, labels = load_mnist_digits("test")
    # the digit and its position are drawn before the clutter: same seed, same digits
    clean, lab0, boxes = make_canvases(digits, labels, 40, 70, 0, 8, _gen(5))
    noisy, lab1, boxes1 = make_canvases(digits, labels, 40, 70, 6, 8, _gen(5))
    assert torch.equal(lab0, lab1) and torch.equal(boxes, boxes1)
    for i in range(40):
        x0, y0, x1, y1 = boxes[i].long().tolist()
        inside = clean[i, 0, y0:y1, x0:x1]
        # without clutter the box holds exactly one digit of the right label, and nothing else
        matches = (digits == inside).all(dim=2).all(dim=1).nonzero().flatten()
        assert len(matches) >= 1 and (labels[matches] == lab0[i]).any()
        assert clean[i].sum() == inside.sum()
        # the digit's brightest pixel is inside the box
        row, col = divmod(int(clean[i, 0].argmax()), 70)
        assert y0 <= row < y1 and x0 <= col < x1
        # with clutter the digit is still all there (max combination)
        assert torch.all(noisy[i, 0, y0:y1, x0:x1] >= inside)
    assert noisy.sum() > clean.sum()  # clutter was added


def test_clutter_comes_from_other_digits():
    # digit 0 is a full white square, digit 1 is blank: a blank sample's clutter must come from the
    # white square, and a white sample's clutter from the blank digit (changing nothing)
    digits = torch.stack([torch.full((28, 28), 255, dtype=torch.uint8), torch.zeros(28, 28, dtype=torch.uint8)])
    images, labels, _ = make_canvases(digits, torch.tensor([0, 1]), 200, 50, 3, 8, _gen(1))
    sums = images.flatten(1).long().sum(1)
    assert torch.all(sums[labels == 0] == 28 * 28 * 255)
    assert torch.all(sums[labels == 1] >= 8 * 8 * 255)
    assert (labels == 0).any() and (labels == 1).any()


@pytest.mark.parametrize("kw, field", [
    (dict(canvas_size=27), "canvas_size"),
    (dict(clutter_size=29), "clutter_size"),
    (dict(clutter_size=0), "clutter_size"),
    (dict(num_clutter=-1), "num_clutter"),
])
def test_canvas_argument_errors(kw, field):
    digits, labels = load_mnist_digits("test")
    args = dict(n=4, canvas_size=60, num_clutter=4, clutter_size=8)
    args.update(kw)
    with pytest.raises(ValueError, match=field):
        make_canvases(digits, labels, generator=_gen(), **args)


def test_train_epochs_differ_and_are_reproducible():
    ds = ClutteredMNIST(_mnist_config(), "train")
    epoch0 = ds.images.clone()
    ds.set_epoch(1)
    assert not torch.equal(ds.images, epoch0)
    again = ClutteredMNIST(_mnist_config(), "train", epoch=1)
    assert torch.equal(again.images, ds.images) and torch.equal(again.boxes, ds.boxes)
    ds.set_epoch(0)
    assert torch.equal(ds.images, epoch0)
    other_seed = ClutteredMNIST(_mnist_config(seed=4), "train")
    assert not torch.equal(other_seed.images, epoch0)


def test_test_set_is_fixed_and_items_are_normalised():
    a = ClutteredMNIST(_mnist_config(), "test")
    b = ClutteredMNIST(_mnist_config(train_canvases=8), "test")
    a.set_epoch(5)  # no effect on the fixed test set
    assert len(a) == 32 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, ClutteredMNIST(_mnist_config(), "train").images[:32])
    image, label, box = a[0]
    assert image.shape == (1, 60, 60) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() == -1.0
    assert isinstance(label, int) and 0 <= label <= 9
    assert box.shape == (4,) and box.dtype == torch.float32
    assert torch.allclose(image, a.images[0].float() / 255 * 2 - 1)
    assert a.classes == [str(d) for d in range(10)] and a.boxes.shape == (32, 4)


def test_cluttered_mnist_channels_and_mean_errors():
    rgb = ClutteredMNIST(_mnist_config(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]), "test", channels=3)
    image, _, _ = rgb[0]
    assert image.shape == (3, 60, 60) and torch.equal(image[0], image[2])
    with pytest.raises(ValueError, match="data.mean"):
        ClutteredMNIST(_mnist_config(mean=[0.4, 0.5, 0.6]), "test")
    with pytest.raises(ValueError, match="split"):
        ClutteredMNIST(_mnist_config(), "val")


def test_build_datasets_cluttered_mnist():
    train, evaluation, names = build_datasets(_mnist_config(), channels=1)
    assert names == [str(d) for d in range(10)]
    assert len(train) == 64 and len(evaluation) == 32
    batch = next(iter(DataLoader(evaluation, batch_size=8)))
    assert batch[0].shape == (8, 1, 60, 60) and batch[2].shape == (8, 4)


def test_build_datasets_errors():
    with pytest.raises(ValueError, match="data.dataset"):
        build_datasets(DataConfig(dataset="imagenet"), channels=3)
    with pytest.raises(ValueError, match="data.root"):
        build_datasets(DataConfig(dataset="folder"), channels=3)


# ----------------------------------------------------------------------------------------------
# image folders

def _folder_config(**kw):
    base = dict(image_size=32, resize_size=36, max_bad_fraction=0.5)
    base.update(kw)
    return DataConfig(**base)


def _rgb(size=(48, 40), color=(200, 30, 60)):
    return Image.new("RGB", size, color)


def _make_tree(root, splits=("train", "val"), classes=("zebra", "ant", "bee"), per_class=2):
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                _rgb(color=(10 * i, 50, 90)).save(folder / f"img{i}.png")
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_classes_sorted_and_labels(tmp_path):
    root = _make_tree(tmp_path)
    _rgb().save(root / "train" / "bee" / "upper.JPG", format="JPEG")
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, "train", _folder_config(), train=True)
    assert ds.classes == ["ant", "bee", "zebra"]
    assert len(ds) == 7  # .txt skipped, upper-case extension found
    for path, label in ds.samples:
        assert ds.classes[label] in path.split("/")
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    evaluation = ImageFolderDataset(root, "val", _folder_config(), train=False, classes=ds.classes)
    assert evaluation.targets == [0, 0, 1, 1, 2, 2]
    assert evaluation[5][0].shape == (3, 32, 32)


def test_load_image_conversions(tmp_path):
    cases = {}
    cases["gray.png"] = Image.new("L", (8, 8), 100)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    cases["rgba.png"] = rgba
    cases["la.png"] = Image.new("LA", (8, 8), (0, 0))  # transparent black gray
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    cases["palette.gif"] = palette
    cases["deep16.png"] = Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16))
    cases["deep16.tif"] = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    cases["cmyk.jpg"] = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # white
    cases["deep16.pgm"] = Image.fromarray(np.full((8, 8), 257 * 50, dtype=np.uint16))
    cases["bits.bmp"] = Image.new("1", (8, 8), 1)
    for name, img in cases.items():
        img.save(tmp_path / name)

    def pixel(name, channels=3):
        img = load_image(tmp_path / name, channels)
        assert img.mode == ("RGB" if channels == 3 else "L")
        return np.asarray(img)[1, 1], np.asarray(img)[0, 0]

    assert tuple(pixel("gray.png")[0]) == (100, 100, 100)
    inner, corner = pixel("rgba.png")
    assert tuple(inner) == (255, 255, 255) and tuple(corner) == (255, 0, 0)  # onto white
    assert tuple(pixel("la.png")[0]) == (255, 255, 255)
    assert tuple(pixel("palette.gif")[0]) == (10, 200, 30)
    assert tuple(pixel("deep16.png")[0]) == (100, 100, 100)  # scaled, not clipped to 255
    assert tuple(pixel("deep16.tif")[0]) == (255, 255, 255)
    assert tuple(pixel("deep16.pgm")[0]) == (50, 50, 50)
    assert min(pixel("cmyk.jpg")[0]) >= 250
    assert tuple(pixel("bits.bmp")[0]) == (255, 255, 255)
    assert pixel("deep16.png", channels=1)[0] == 100
    assert pixel("rgba.png", channels=1)[0] == 255


def test_load_image_errors(tmp_path):
    _rgb().save(tmp_path / "a.jpg")
    _rgb().save(tmp_path / "b.png")
    for name in ("a.jpg", "b.png"):
        _truncate(tmp_path / name)
        with pytest.raises(ImageReadError, match=name):
            load_image(tmp_path / name)
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageReadError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageReadError, ValueError)


@pytest.mark.parametrize("name", ["broken.jpg", "broken.png"])
def test_truncated_file_is_skipped_and_counted(tmp_path, name):
    root = _make_tree(tmp_path, per_class=3)
    bad = root / "train" / "bee" / name
    _rgb().save(bad)
    _truncate(bad)
    ds = ImageFolderDataset(root, "train", _folder_config(max_bad_fraction=0.2), train=True)
    assert len(ds) == 10
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad)
    images = sum(batch[0].shape[0] for batch in loader if batch is not None)
    assert images == 9
    assert ds.bad_files == [str(bad)] and ds.seen_count == 10
    ds.check_bad_fraction()  # 1 of 10 is below 0.2
    # a second epoch does not count the file twice
    list(loader)
    assert ds.bad_files == [str(bad)]


def test_bad_files_seen_by_main_process_with_workers(tmp_path):
    root = _make_tree(tmp_path, per_class=4)
    bad = root / "train" / "zebra" / "img0.png"
    _truncate(bad)
    ds = ImageFolderDataset(root, "train", _folder_config(max_bad_fraction=0.1), train=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_bad)
    assert sum(b[0].shape[0] for b in loader if b is not None) == 11
    assert ds.bad_files == [str(bad)] and ds.seen_count == 12
    ds.check_bad_fraction()  # 1/12 is below 0.1


def test_bad_fraction_error(tmp_path):
    root = _make_tree(tmp_path, per_class=3)
    bad = [root / "train" / "ant" / "img0.png", root / "train" / "bee" / "img1.png"]
    for path in bad:
        _truncate(path)
    # 2 of 9 bad: the early stop inside __getitem__ fires once the bad files exceed 20% of all
    ds = ImageFolderDataset(root, "train", _folder_config(max_bad_fraction=0.2), train=False)
    with pytest.raises(BadFilesError, match="img1.png"):
        list(DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad))
    # check_bad_fraction measures the share among the files read so far
    ds = ImageFolderDataset(root, "train", _folder_config(max_bad_fraction=0.25), train=False)
    assert ds[0] is None and ds[1] is not None
    with pytest.raises(BadFilesError, match="img0.png"):
        ds.check_bad_fraction()  # 1 of 2 read
    for i in range(2, len(ds)):
        ds[i]
    ds.check_bad_fraction()  # 2 of 9 is below 0.25


def test_folder_layout_errors(tmp_path):
    config = _folder_config()
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", "train", config, train=True)
    root = _make_tree(tmp_path / "data", splits=("train",))
    with pytest.raises(DatasetError, match="val"):
        ImageFolderDataset(root, "val", config, train=False)
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolderDataset(tmp_path / "flat", "train", config, train=True)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        ImageFolderDataset(root, "train", config, train=True)
    assert issubclass(DatasetError, ValueError)


def test_class_mismatch_error(tmp_path):
    root = _make_tree(tmp_path, splits=("train",), classes=("ant", "bee"))
    _make_tree(tmp_path, splits=("val",), classes=("ant", "cow"))
    config = _folder_config(root=str(root), dataset="folder")
    with pytest.raises(DatasetError, match=r"missing \['bee'\], extra \['cow'\]"):
        build_datasets(config, channels=3)


def test_build_datasets_folder(tmp_path):
    root = _make_tree(tmp_path)
    train, evaluation, names = build_datasets(_folder_config(root=str(root), dataset="folder"), channels=3)
    assert names == ["ant", "bee", "zebra"] and len(train) == len(evaluation) == 6


def test_small_images(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        _rgb(size=(20, 50)).save(root / split / "a" / "tiny.png")
    ds = ImageFolderDataset(root, "val", _folder_config(small_images="resize"), train=False)
    assert ds[0][0].shape == (3, 32, 32)
    ds = ImageFolderDataset(root, "train", _folder_config(small_images="resize"), train=True)
    assert ds[0][0].shape == (3, 32, 32)
    ds = ImageFolderDataset(root, "val", _folder_config(small_images="error"), train=False)
    with pytest.raises(ImageTooSmallError, match=r"tiny\.png.*20x50"):
        ds[0]


def test_transforms(tmp_path):
    config = _folder_config(mean=[0.5], std=[0.25])
    with pytest.raises(ValueError, match="data.mean"):
        build_transforms(config, train=True, channels=3)
    gray = build_transforms(config, train=False, channels=1)(Image.new("L", (40, 60), 255))
    assert gray.shape == (1, 32, 32) and torch.allclose(gray, torch.full_like(gray, 2.0))
    with pytest.raises(ValueError, match="data.interpolation"):
        build_transforms(_folder_config(interpolation="lanczos"), train=True, channels=3)
    with pytest.raises(ValueError, match="data.small_images"):
        build_transforms(_folder_config(small_images="pad"), train=True, channels=3)
    evaluation = build_transforms(_folder_config(), train=False, channels=3)
    x = evaluation(_rgb(color=(124, 116, 104)))  # about the ImageNet mean: about zero
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02
