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
        assert 1 <= p["exit_step"] <= 3 and len(p["boxes"]) == p["exit_step"]
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
    assert "no budget fits" in capsys.readouterr().err


def test_budget_without_curve_says_to_evaluate(files, tmp_path, capsys):
    good, _ = files
    torch.manual_seed(0)
    model = create_model("demo", num_classes=4)
    save_checkpoint(model, tmp_path / "m.pt", run_config={"data": dict(
        dataset="folder", image_size=48, resize_size=56, mean=[0.5], std=[0.25])})
    rc = main(["predict", str(good[0]), "--checkpoint", str(tmp_path / "m.pt"), "--budget", "1e9"])
    assert rc == 2
    assert "glancefocus evaluate" in capsys.readouterr().err
