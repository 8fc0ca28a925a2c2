"""The real-data path: fine-tuning the authors' presets on another class set (CPU, offline)."""
import colorsys
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from glancefocus.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from glancefocus.cli import main
from glancefocus.config import load_config
from glancefocus.model import GlanceFocusNet, create_model
from glancefocus.presets import PRESETS, get_preset
from glancefocus.train import train
from glancefocus.train.optim import describe_training, freeze_for_stage, gfnet_sgd

CLASSES = 10


def colour_folder(root, per_class=(8, 4), size=(56, 64), classes=CLASSES):
    """ROOT/train|val/<class>/*.png: each class a hue, with noise; learnable in a few epochs."""
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for label in range(classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            rgb = torch.tensor(colorsys.hsv_to_rgb(label / classes, 0.9, 0.9)) * 255
            for i in range(count):
                noise = torch.randint(-40, 40, (*size, 3), generator=generator)
                pixels = (rgb + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def cascaded_config(tmp_path, *overrides):
    """The authors' MobileNet-V3 recipe (frozen glance encoder), shrunk to 64 px, from random
    weights."""
    return load_config(None, [
        "model.pretrained=false", "model.patch_size=32", "data.image_size=64",
        "data.resize_size=64", f"data.root={tmp_path / 'images'}", "train.batch_size=16",
        "data.num_workers=0", "train.stage1.epochs=4", f"train.out_dir={tmp_path / 'run'}",
        *overrides], base=get_preset("mobilenetv3_large_100"))


def test_new_glance_head_learns_on_a_frozen_glance_encoder(tmp_path, caplog):
    """Step 1 of a cascaded model is the glance encoder's own head: on a new class set it must
    train although the glance encoder is frozen, or step 1 stays at chance."""
    colour_folder(tmp_path / "images")
    config = cascaded_config(tmp_path)
    assert config.train.stage1.train_glance_encoder is False
    caplog.set_level("INFO", logger="glancefocus")
    history = train(config, stages=(1,), progress=False)
    # the random glance encoder's features are almost constant (eval-mode BatchNorm with fresh
    # statistics), so a few epochs give little above chance; the head untrained gave 9-10 %
    step1 = history[1][-1]["eval_accuracy"][0]
    assert step1 >= 2.5 * 100 / CLASSES, f"step-1 accuracy {step1:.1f} % (chance {100 / CLASSES:.0f} %)"
    assert "glance encoder's new head" in caplog.text
    # the rest of the glance encoder did not move
    stage1 = read_checkpoint(tmp_path / "run" / "stage1" / "last.pt")
    assert stage1["pretrained_glance_head"] is False


def test_only_the_new_glance_head_trains_at_the_classifier_lr():
    model = create_model("mobilenetv3_large_100", num_classes=CLASSES, patch_size=32,
                         pretrained=False)
    stage = load_config(None, [], base=get_preset("mobilenetv3_large_100")).train.stage1
    freeze_for_stage(model, 1, stage)
    head = set(map(id, model.glance_encoder.head.parameters()))
    glance_rest = [p for p in model.glance_encoder.parameters() if id(p) not in head]
    assert all(p.requires_grad for p in model.glance_encoder.head.parameters())
    assert not any(p.requires_grad for p in glance_rest)
    optimizer = gfnet_sgd(model, 1, stage)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {lr_of[i] for i in head} == {stage.classifier_lr}
    # a head that holds pretrained weights for these classes stays frozen
    model.pretrained_glance_head = True
    freeze_for_stage(model, 1, stage)
    assert not any(p.requires_grad for p in model.glance_encoder.head.parameters())
    assert "with its pretrained head" in describe_training(model, 1, stage)


def test_pretrained_head_is_recorded_from_the_weights(tmp_path):
    """A local weights file with a head for these classes gives a pretrained head; another
    class count or no weights gives a new one."""
    donor = create_model("mobilenetv3_large_100", num_classes=CLASSES, patch_size=32)
    path = tmp_path / "weights.pt"
    torch.save(donor.glance_encoder.backbone.state_dict(), path)
    same = create_model("mobilenetv3_large_100", num_classes=CLASSES, patch_size=32,
                        pretrained=str(path))
    assert same.pretrained_glance_head
    assert torch.equal(same.glance_encoder.head.weight, donor.glance_encoder.head.weight)
    other = create_model("mobilenetv3_large_100", num_classes=CLASSES + 1, patch_size=32,
                         pretrained=str(path))
    assert not other.pretrained_glance_head
    assert not create_model("mobilenetv3_large_100", num_classes=CLASSES, patch_size=32).pretrained_glance_head
    # the flag survives a checkpoint
    save_checkpoint(same, tmp_path / "model.pt")
    assert load_checkpoint(tmp_path / "model.pt").pretrained_glance_head


def test_separate_glance_weights(tmp_path):
    """model.pretrained_glance: the glance encoder from its own file, as the authors' stage 1."""
    glance, focus = (create_model("demo", num_classes=10) for _ in range(2))
    torch.save(glance.glance_encoder.backbone.state_dict(), tmp_path / "glance.pt")
    torch.save(focus.focus_encoder.backbone.state_dict(), tmp_path / "focus.pt")
    model = create_model("demo", num_classes=10, pretrained=str(tmp_path / "focus.pt"),
                         pretrained_glance=str(tmp_path / "glance.pt"))
    assert torch.equal(model.glance_encoder.backbone.features[0].weight,
                       glance.glance_encoder.backbone.features[0].weight)
    assert torch.equal(model.focus_encoder.backbone.features[0].weight,
                       focus.focus_encoder.backbone.features[0].weight)


# ----------------------------------------------------------------------------------------------
# the authors' recipe

TAGS = {"resnet50": "tv_in1k", "densenet121": "tv_in1k", "densenet169": "tv_in1k",
        "densenet201": "tv_in1k", "regnety_600m": "pycls_in1k", "regnety_800m": "pycls_in1k",
        "regnety_1.6g": "pycls_in1k", "mobilenetv3_large_100": "ra_in1k",
        "efficientnet_b2": "ra_in1k", "efficientnet_b3": "ra2_in1k"}


def test_authors_presets_start_from_their_kind_of_imagenet_weights():
    import timm

    for name, tag in TAGS.items():
        model = PRESETS[name]["model"]
        assert model["pretrained"] is True, name
        assert model["pretrained_tag"] == tag, name
        assert f"{model['arch']}.{tag}" in timm.list_pretrained(f"{model['arch']}.*"), name
    assert PRESETS["mobilenetv3_large_125"]["model"]["pretrained"] is True
    assert PRESETS["demo"]["model"].get("pretrained", False) is False


def test_pretrained_offline_is_one_clear_error_before_anything_is_written(tmp_path):
    colour_folder(tmp_path / "images", per_class=(1, 1))
    config = load_config(None, [f"data.root={tmp_path / 'images'}",
                                f"train.out_dir={tmp_path / 'run'}"],
                         base=get_preset("mobilenetv3_large_100"))
    with pytest.raises(ValueError, match=r"model.pretrained=PATH") as error:
        train(config, progress=False)
    assert "\n" not in str(error.value)
    assert "mobilenetv3_large_100.ra_in1k" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_regularisation_of_the_authors_train_script():
    for name, drop in (("mobilenetv3_large_100", 0.2), ("efficientnet_b2", 0.3)):
        kwargs = PRESETS[name]["model"]["encoder_kwargs"]
        assert kwargs == {"drop_rate": drop, "drop_path_rate": 0.2}
        model = create_model(name, num_classes=5, pretrained=False)
        assert model.focus_encoder.backbone.drop_rate == drop
    for name in ("resnet50", "densenet121", "regnety_600m"):
        assert not PRESETS[name]["model"].get("encoder_kwargs")


def test_head_dropout_only_in_training():
    model = create_model("mobilenetv3_large_100", num_classes=5, patch_size=32, max_steps=2,
                         pretrained=False, encoder_kwargs={"drop_rate": 0.5})
    images = torch.randn(4, 3, 48, 48)
    model.eval()
    first, second = model(images).logits, model(images).logits
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(0)
    a = model(images, locations="random").logits
    torch.manual_seed(0)
    model.focus_encoder.backbone.drop_rate = 0.0
    model.glance_encoder.backbone.drop_rate = 0.0
    b = model(images, locations="random").logits
    assert not torch.allclose(a, b)


def test_regnet_trains_the_glance_with_the_gru_and_imports_keep_the_encoder_head():
    assert PRESETS["regnety_600m"]["model"]["glance_head"] == "classifier"
    model = create_model("regnety_600m", num_classes=7, pretrained=False)
    assert model.config.glance_head == "classifier"


def test_class_count_is_read_from_the_folders(tmp_path):
    from glancefocus.train.stages import with_class_count

    colour_folder(tmp_path / "images", per_class=(1, 1))
    config = cascaded_config(tmp_path)
    assert config.model.num_classes is None
    from glancefocus.data import build_datasets

    _, _, classes = build_datasets(config.data, 3)
    assert with_class_count(config, classes).model.num_classes == CLASSES
    wrong = load_config(None, ["model.num_classes=3"], base={"model": {"arch": "demo_cnn"}})
    with pytest.raises(ValueError, match="the data has 10 classes but model.num_classes is 3"):
        with_class_count(wrong, classes)


def test_demo_preset_trains_on_a_folder(tmp_path, capsys):
    """The demo preset leaves the class count to the data: a folder of 3 classes trains (a few
    one-stage steps, grey 48 x 48 images); a folder given without data.dataset=folder is a
    clear error rather than silently unread."""
    root = colour_folder(tmp_path / "images", per_class=(6, 2), classes=3)
    small = [f"data.root={root}", "data.image_size=48", "data.resize_size=48",
             "model.patch_size=16", "model.classifier_hidden=16", "model.policy_hidden=16",
             "train.batch_size=16", "train.recipe=one-stage", "train.one_stage.epochs=1",
             f"train.out_dir={tmp_path / 'run'}"]
    assert main(["train", "--preset", "demo", "--no-progress", *small]) == 2
    assert "add data.dataset=folder" in capsys.readouterr().err
    assert main(["train", "--preset", "demo", "--no-progress", "data.dataset=folder", *small]) == 0
    model = load_checkpoint(tmp_path / "run" / "one-stage" / "last.pt")
    assert model.config.num_classes == 3 and model.config.in_chans == 1
    assert model.class_names == ["class00", "class01", "class02"]


def test_num_classes_unset_outside_training_is_a_clear_error():
    config = load_config(None, ["model.arch=demo_cnn", "model.in_chans=1"])
    with pytest.raises(ValueError, match="model.num_classes is not set"):
        GlanceFocusNet(config.model)


def test_amp_auto_takes_bf16_only_where_the_hardware_has_it(monkeypatch):
    """bf16 autocast on a CPU without AVX512-BF16 or AMX is emulated, many times slower than
    float32 (a demo epoch: 405 s against 35 s on an AVX2 CPU): 'auto' then trains in float32."""
    from glancefocus.train import runtime

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert runtime.amp_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    with pytest.raises(ValueError, match="'auto'"):
        runtime.amp_dtype("float8", cpu)
