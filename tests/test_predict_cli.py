"""`glancefocus predict` on real photos and on odd or broken files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from glancefocus import create_model, exits, save_checkpoint
from glancefocus.cli import main


def tiny_checkpoint(path, channels):
    """A random demo-CNN GFNet taking `channels` channels at 48 x 48, with a calibrated curve."""
    torch.manual_seed(0)
    model = create_model("demo", in_chans=channels, num_classes=4).eval()
    model.class_names = ["apple", "bird", "car", "dog"]
    data = dict(dataset="folder", image_size=48, resize_size=56, mean=[0.5] * channels,
                std=[0.25] * channels)
    with torch.no_grad():
        logits = model(torch.randn(64, channels, 48, 48)).logits
    conf, pred = exits.confidences_from_logits(logits)
    model.exit_curve = exits.budgeted_curve(conf, conf, pred, torch.zeros(64, dtype=torch.long),
                                            model.macs()["per_step"])
    save_checkpoint(model, path, run_config={"data": data})
    return model


def write_odd_files(folder):
    """Real photos and every awkward kind of file; returns (readable, unreadable) paths."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {
        "astronaut.png": Image.fromarray(photos.astronaut()),
        "coffee.jpg": Image.fromarray(photos.coffee()),
        "chelsea.jpg": Image.fromarray(photos.chelsea()),
        "camera.png": Image.fromarray(photos.camera()),                      # grayscale photo
        "gray.png": Image.fromarray(np.linspace(0, 255, 64 * 80).astype(np.uint8).reshape(64, 80)),
        "rgba.png": Image.fromarray(np.dstack([photos.chelsea(),
                                               np.full(photos.chelsea().shape[:2], 128, np.uint8)])),
        "palette.png": Image.fromarray(photos.coffee()).convert("P", palette=Image.ADAPTIVE),
        "sixteen.png": Image.fromarray((np.arange(60 * 70, dtype=np.uint16) * 15).reshape(60, 70)),
        "tiny.png": Image.fromarray(np.full((5, 5, 3), 200, np.uint8)),
        "huge.jpg": Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), np.uint8)),
    }
    paths = []
    for name, image in good.items():
        image.save(folder / name)
        paths.append(folder / name)
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    whole = (folder / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (folder / "notes.jpg").write_text("not an image")
    bad = [folder / "truncated.jpg", folder / "notes.jpg", folder / "missing.png"]
    return paths, bad


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_odd_files(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("channels", [1, 3])
def test_every_readable_file_gets_an_answer_and_bad_files_a_clear_error(files, channels, tmp_path, capsys):
    good, bad = files
    ckpt = tmp_path / "model.pt"
    tiny_checkpoint(ckpt, channels)
    # bad files mixed in between good ones, and a batch size that splits the list
    paths = good[:3] + bad + good[3:]
    rc = main(["predict", *map(str, paths), "--checkpoint", str(ckpt), "--json",
               "--visualize", str(tmp_path / "vis"), "--batch-size", "4"])
    captured = capsys.readouterr()
    assert rc == 1
    result = json.loads(captured.out)
    assert [p["file"] for p in result["predictions"]] == [str(p) for p in good]
    for p in result["predictions"]:
        assert p["class_name"] in ("apple", "bird", "car", "dog")
        assert 1 <= p["exit_step"] <= 3 and len(p["boxes_in_original_pixels"]) == p["exit_step"]
        width, height = p["original_size"]
        assert all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                   for x0, y0, x1, y1 in p["boxes_in_original_pixels"])
        assert 0 < p["confidence"] <= 1 and p["macs"] > 0
    assert [e["file"] for e in result["errors"]] == [str(p) for p in bad]
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == len(bad)
    for path, line in zip(bad, error_lines):
        assert str(path) in line and line.startswith("glancefocus predict: error:")
    for path in good:
        assert (tmp_path / "vis" / f"{path.stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_table_output_budget_and_exit_status(files, tmp_path, capsys):
    good, _ = files
    ckpt = tmp_path / "model.pt"
    model = tiny_checkpoint(ckpt, 1)
    rc = main(["predict", *map(str, good[:4]), "--checkpoint", str(ckpt)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].split() == ["file", "class", "confidence", "steps", "MACs"]
    assert all(str(p) in out for p in good[:4])

    # at the cheapest budget nobody runs beyond what it allows on average
    cheapest = min(model.exit_curve["macs"])
    rc = main(["predict", *map(str, good), "--checkpoint", str(ckpt), "--budget", str(cheapest * 1.001),
               "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["thresholds"] == exits.thresholds_for_budget(model.exit_curve, cheapest * 1.001).tolist()
    assert min(p["exit_step"] for p in result["predictions"]) == 1

    rc = main(["predict", str(good[0]), "--checkpoint", str(ckpt), "--budget", "10"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no budget fits" in err and f"spans {min(model.exit_curve['macs']):.6g} to" in err

    # above the curve: a one-line warning naming its range, then the answers at its end
    most = max(model.exit_curve["macs"])
    rc = main(["predict", str(good[0]), "--checkpoint", str(ckpt), "--budget", str(most * 5), "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err.startswith("glancefocus predict: warning: the budget of")
    assert f"to {most:.6g} MACs per image" in captured.err and captured.err.count("\n") == 1
    assert json.loads(captured.out)["thresholds"] == exits.thresholds_for_budget(model.exit_curve, most).tolist()


def test_budget_without_curve_says_to_evaluate(files, tmp_path, capsys):
    good, _ = files
    torch.manual_seed(0)
    model = create_model("demo", num_classes=4)
    save_checkpoint(model, tmp_path / "m.pt", run_config={"data": dict(
        dataset="folder", image_size=48, resize_size=56, mean=[0.5], std=[0.25])})
    rc = main(["predict", str(good[0]), "--checkpoint", str(tmp_path / "m.pt"), "--budget", "1e9"])
    assert rc == 2
    assert "glancefocus evaluate" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# which files, top-k, boxes in the original pixels, the public transform, overlays

def test_folders_and_globs_expand_to_sorted_image_files(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    tiny_checkpoint(ckpt, 3)
    root = tmp_path / "photos"
    for rel in ("b.png", "a.jpg", "sub/c.png", "sub/deeper/d.JPG", ".hidden.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos.coffee()[:80, :90]).save(root / rel, format="PNG")
    (root / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    expected = [str(root / r) for r in ("a.jpg", "b.png", "sub/c.png", "sub/deeper/d.JPG")]

    rc = main(["predict", str(root), "--checkpoint", str(ckpt), "--json"])
    assert rc == 0
    assert [p["file"] for p in json.loads(capsys.readouterr().out)["predictions"]] == expected

    # a quoted glob is expanded by the command (recursive **), a repeated file counted once
    rc = main(["predict", str(root / "**" / "*.png"), str(root / "b.png"), "--checkpoint", str(ckpt),
               "--json"])
    assert rc == 0
    files = [p["file"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    assert files == [str(root / "b.png"), str(root / "sub/c.png")]

    # a glob or folder that gives no images is an error line; the other inputs still answer
    rc = main(["predict", str(tmp_path / "nothing*.png"), str(tmp_path / "empty"), str(root / "a.jpg"),
               "--checkpoint", str(ckpt)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "no image files match" in captured.err and "holds no image files" in captured.err
    assert str(root / "a.jpg") in captured.out


def test_top_k_probabilities_in_table_and_json(files, tmp_path, capsys):
    good, _ = files
    ckpt = tmp_path / "model.pt"
    tiny_checkpoint(ckpt, 3)
    rc = main(["predict", str(good[0]), str(good[1]), "--checkpoint", str(ckpt), "--top-k", "3",
               "--json", "--device", "auto"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for p in result["predictions"]:
        top = p["top_k"]
        assert len(top) == 3 and top[0]["class_name"] == p["class_name"]
        assert top[0]["probability"] == pytest.approx(p["confidence"])
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert sum(t["probability"] for t in top) <= 1 + 1e-6
    rc = main(["predict", str(good[0]), "--checkpoint", str(ckpt), "--top-k", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and "top-2 (probability)" in out[0]
    first = result["predictions"][0]["top_k"]
    assert f"{first[0]['class_name']} {first[0]['probability']:.3f}, {first[1]['class_name']}" in out[1]
    assert out[-1].startswith("steps: how many steps ran; 1 = the glance")
    assert main(["predict", str(good[0]), "--checkpoint", str(ckpt), "--top-k", "0"]) == 2


def test_boxes_map_back_to_the_original_pixels(tmp_path):
    """A bright square in a non-square file: found in the model's input, its box mapped back
    lands on the square in the file (through the resize and the centre crop)."""
    from glancefocus import create_transform, load_checkpoint

    tiny_checkpoint(tmp_path / "model.pt", 1)
    transform = create_transform(load_checkpoint(tmp_path / "model.pt"))  # Resize(56), CenterCrop(48)
    for size, square in (((300, 180), (150, 60, 210, 120)), ((140, 420), (30, 200, 100, 270))):
        pixels = np.zeros(size[::-1], np.uint8)
        x0, y0, x1, y1 = square
        pixels[y0:y1, x0:x1] = 255
        tensor = transform(Image.fromarray(pixels))
        rows, cols = torch.nonzero(tensor[0] > 0.5 * tensor.max() + 0.5 * tensor.min(), as_tuple=True)
        input_box = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        mapped = transform.boxes_to_original([input_box], size)[0]
        scale = size[0] / transform.geometry(size).resized_size[0]
        assert mapped == pytest.approx(list(square), abs=2 * scale)
        # the whole model input is the centre crop of the file
        crop = transform.boxes_to_original([[0, 0, 48, 48]], size)[0]
        side = min(size)
        assert crop[2] - crop[0] == pytest.approx(side * 48 / 56, abs=2 * scale)
        assert (crop[0] + crop[2]) / 2 == pytest.approx(size[0] / 2, abs=scale)
        assert (crop[1] + crop[3]) / 2 == pytest.approx(size[1] / 2, abs=scale)


def test_create_transform_is_what_the_command_feeds(files, tmp_path, capsys):
    import glancefocus as gf

    good, _ = files
    ckpt = tmp_path / "model.pt"
    tiny_checkpoint(ckpt, 3)
    model = gf.load_checkpoint(ckpt)
    transform = gf.create_transform(model)
    images = torch.stack([transform(str(path)) for path in good[:3]])
    assert images.shape == (3, 3, 48, 48)
    # a PIL image in another mode gets load_image's conversion
    assert torch.equal(transform(Image.open(good[3])), transform(str(good[3])))
    answers = model.predict(images, budget=model.exit_curve["macs"][20])
    # the same images in one batch of 3 on the same device: the same kernels, the same answers
    assert main(["predict", *map(str, good[:3]), "--checkpoint", str(ckpt), "--json",
                 "--budget", str(model.exit_curve["macs"][20]), "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)["predictions"]
    for answer, row in zip(answers, cli):
        assert (answer.label, answer.exit_step, answer.boxes) == (row["label"], row["exit_step"],
                                                                  row["boxes_in_model_input"])
        assert answer.confidence == pytest.approx(row["confidence"])
    assert gf.resolve_data_config(model).image_size == 48


def test_overlays_number_the_glance_1_and_the_patches_from_2(files, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    good, _ = files
    ckpt = tmp_path / "model.pt"
    tiny_checkpoint(ckpt, 3)
    numbers = []
    original = Axes.text

    def record(self, x, y, s, *args, **kwargs):
        numbers.append(s)
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", record)
    rc = main(["predict", str(good[0]), "--checkpoint", str(ckpt), "--visualize", str(tmp_path / "vis")])
    assert rc == 0
    assert numbers == ["1", "2", "3"]       # every step runs without --budget: T = 3
    assert (tmp_path / "vis" / f"{good[0].stem}.png").read_bytes()[:4] == b"\x89PNG"
