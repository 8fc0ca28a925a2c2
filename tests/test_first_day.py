"""A user's first day, as the README tells it: fine-tune a GFNet made for other classes on an image
folder, evaluate it at a budget, predict a folder of new images (CPU, offline, a tiny timm CNN)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

import glancefocus as gf
from glancefocus.checkpoint import read_checkpoint
from glancefocus.cli import main
from glancefocus.model import GlanceFocusNet

# the README's resnet50 recipe, shrunk: a tiny timm CNN, 64 px images, P 32, T 3
SMALL = ["model.arch=test_resnet", "model.patch_size=32", "model.max_steps=3",
         "model.classifier_hidden=32", "model.policy_hidden=32", "data.image_size=64",
         "data.resize_size=72", "data.num_workers=0", "train.batch_size=8",
         "train.stage1.epochs=1", "train.stage2.updates=2", "train.stage3.epochs=1",
         "train.calibrate_images=64"]
CLASSES = ["abyssinian", "beagle", "boxer", "persian"]


def pet_folder(root):
    """ROOT/train|val/<breed>/*.jpg, photos of several sizes (a class is a colour)."""
    generator = torch.Generator().manual_seed(1)
    for split, count in (("train", 6), ("val", 3)):
        for label, breed in enumerate(CLASSES):
            folder = root / split / breed
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = 80 + 8 * i, 96 + 4 * label
                pixels = torch.randint(0, 120, (height, width, 3), generator=generator)
                pixels[..., label % 3] += 120
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{breed}_{i}.jpg")
    return root


def small_resnet_preset(num_classes):
    """The resnet50 preset's model with SMALL's model overrides."""
    from glancefocus.config import load_config
    from glancefocus.presets import get_preset

    overrides = [item for item in SMALL if item.startswith("model.")]
    config = load_config(None, overrides + [f"model.num_classes={num_classes}",
                                            "model.pretrained=false"], base=get_preset("resnet50"))
    return GlanceFocusNet(config.model)


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def imagenet_gfnet(tmp_path):
    """Stands in for the authors' converted ImageNet GFNet: the same architecture, 1000 classes."""
    model = small_resnet_preset(num_classes=1000)
    path = tmp_path / "imagenet-gfnet.pt"
    gf.save_checkpoint(model, path)
    return model, path


def test_fine_tune_evaluate_at_a_budget_predict_a_folder(tmp_path, capsys, imagenet_gfnet):
    source, source_path = imagenet_gfnet
    data = pet_folder(tmp_path / "pets")
    run_dir = tmp_path / "runs" / "pets"
    train_args = ["train", "--preset", "resnet50", "--init", source_path, "--no-progress",
                  f"data.root={data}", f"train.out_dir={run_dir}", *SMALL]

    # the recipe, resolved, before anything runs; the class count comes from the folders
    status, out, _ = run(capsys, *train_args, "--print-config")
    assert status == 0 and not run_dir.exists()
    assert "model.num_classes: 4 (the data has 4 classes)" in out
    assert "stage 2: 2 PPO updates" in out

    # fine-tune from the 1000-class GFNet: class-sized layers start fresh, the rest carries over
    status, _, err = run(capsys, *train_args)
    assert status == 0, err
    assert "these layers start fresh" in err and "classifier.fc" in err
    stage1 = read_checkpoint(run_dir / "stage1" / "last.pt")
    assert stage1["config"]["model"]["num_classes"] == 4
    assert stage1["class_names"] == CLASSES
    started = small_resnet_preset(num_classes=4)
    from glancefocus.train.state import load_initial_weights

    load_initial_weights(started, source_path)
    assert torch.equal(started.policy.state_dict()["actor.0.weight"],
                       source.policy.state_dict()["actor.0.weight"])
    assert torch.equal(started.classifier.rnn.weight_ih_l0, source.classifier.rnn.weight_ih_l0)

    # a second run into the same folder is refused unless asked
    status, _, err = run(capsys, *train_args)
    assert status == 2 and "--overwrite" in err and "--resume" in err

    # evaluate at a budget: a new file with the calibrated exits, the checkpoint left alone
    last = run_dir / "stage3" / "last.pt"
    before = last.read_bytes()
    eval_dir = run_dir / "eval"
    status, out, err = run(capsys, "evaluate", "--checkpoint", last, "--out", eval_dir)
    assert status == 0, err
    assert last.read_bytes() == before
    macs = sorted(json.loads((eval_dir / "evaluation.json").read_text())["budgeted"]["macs"])
    budget = macs[len(macs) // 2]  # the middle of the calibrated curve
    model = gf.load_checkpoint(eval_dir / "model.pt")
    status, out, err = run(capsys, "evaluate", "--checkpoint", last, "--out", eval_dir,
                           "--budget", budget)
    assert status == 0, err
    assert "budget" in out.lower()

    # predict a folder of new photos, top-2, boxes in the files' own pixels
    photos = tmp_path / "new-photos"
    photos.mkdir()
    for i, path in enumerate(sorted((data / "val").rglob("*.jpg"))[:3]):
        Image.open(path).save(photos / f"photo{i}.jpg")
    status, out, err = run(capsys, "predict", photos, "--checkpoint", eval_dir / "model.pt",
                           "--budget", budget, "--top-k", "2", "--json")
    assert status == 0, err
    answer = json.loads(out)
    rows = answer["predictions"] if isinstance(answer, dict) else answer
    assert len(rows) == 3
    for row in rows:
        assert len(row["top_k"]) == 2 and row["top_k"][0]["class_name"] in CLASSES
        width, height = row["original_size"]
        for x0, y0, x1, y1 in row["boxes_in_original_pixels"]:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height

    # the same preprocessing from Python
    transform = gf.create_transform(model)
    image = transform(Image.open(photos / "photo0.jpg").convert("RGB"))
    assert image.shape == (3, 64, 64)
    assert model.predict(image[None], budget=budget, top_k=2)[0].top_k[0]["class_name"] in CLASSES


def test_the_same_day_with_the_one_stage_recipe(tmp_path, capsys, imagenet_gfnet):
    _, source_path = imagenet_gfnet
    data = pet_folder(tmp_path / "pets")
    run_dir = tmp_path / "runs" / "pets"
    status, _, err = run(capsys, "train", "--preset", "resnet50", "--init", source_path,
                         "--no-progress", f"data.root={data}", f"train.out_dir={run_dir}", *SMALL,
                         "train.recipe=one-stage", "train.one_stage.epochs=1")
    assert status == 0, err
    assert "these layers start fresh" in err and "one-stage epoch 1/1" in err
    last = run_dir / "one-stage" / "last.pt"
    assert read_checkpoint(last)["class_names"] == CLASSES
    eval_dir = run_dir / "eval"
    status, _, err = run(capsys, "evaluate", "--checkpoint", last, "--out", eval_dir)
    assert status == 0, err
    macs = sorted(json.loads((eval_dir / "evaluation.json").read_text())["budgeted"]["macs"])
    status, out, err = run(capsys, "predict", data / "val" / "beagle", "--checkpoint",
                           eval_dir / "model.pt", "--budget", macs[len(macs) // 2], "--json")
    assert status == 0, err
    answer = json.loads(out)
    rows = answer["predictions"] if isinstance(answer, dict) else answer
    assert len(rows) == 3 and all(row["top_k"][0]["class_name"] in CLASSES for row in rows)


def test_init_with_trust_pickle_is_accepted_by_train(tmp_path, capsys, write_crafted_pickle):
    """--trust-pickle exists on train (for --init from an authors' file); without it a full
    pickle is refused before it is unpickled."""
    data = pet_folder(tmp_path / "pets")
    crafted = tmp_path / "resnet50_patch_size_96_T_5.pth.tar"
    marker = tmp_path / "ran-code"
    write_crafted_pickle(crafted, marker, key="model_prime_state_dict")
    status, _, err = run(capsys, "train", "--preset", "resnet50", "--init", crafted,
                         f"data.root={data}", f"train.out_dir={tmp_path / 'run'}", *SMALL)
    assert status == 2 and "--trust-pickle" in err and not marker.exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--trust-pickle" in capsys.readouterr().out
