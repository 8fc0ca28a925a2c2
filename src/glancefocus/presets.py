"""Named configurations as plain data: the authors' eleven backbones and the built-in demo.

A preset is a partial RunConfig dict (sections `model`, `data`, `train`); anything it leaves out
takes the dataclass default, and every field can still be overridden by a file or key=value.
"""
from __future__ import annotations

import copy

from .config import ModelConfig


def _family(backbone_lr, weight_decay, dsn_ratio, train_glance_encoder, stage1_epochs):
    """The per-family recipe of the authors' train.py (SGD, cosine; PPO for stage 2)."""
    stage = dict(backbone_lr=backbone_lr, weight_decay=weight_decay, dsn_ratio=dsn_ratio,
                 train_glance_encoder=train_glance_encoder)
    return {
        "batch_size": 256,
        "stage1": dict(stage, epochs=stage1_epochs, classifier_lr=0.1),
        "stage2": dict(epochs=15),
        "stage3": dict(stage, epochs=stage1_epochs, classifier_lr=0.01),
        # train.recipe=one-stage: stage 1's SGD settings and length, stage 2's PPO settings
        "one_stage": dict(stage, epochs=stage1_epochs, classifier_lr=0.1),
    }


def _imagenet_data(image_size=224, crop_pct=0.875, interpolation="bilinear"):
    return {"dataset": "folder", "image_size": image_size,
            "resize_size": int(image_size / crop_pct), "interpolation": interpolation}


def _pretrained(tag):
    """The authors fine-tune ImageNet-pretrained encoders: the closest weights timm has."""
    return dict(pretrained=True, pretrained_tag=tag)


def _resnet_like(arch, glance_interpolation, tag, **model):
    return {
        "model": dict(arch=arch, classifier="recurrent", classifier_hidden=1024,
                      policy_encoder="linear", policy_hidden=1024,
                      glance_interpolation=glance_interpolation, **_pretrained(tag), **model),
        "data": _imagenet_data(),
    }


def _regnet(timm_name):
    # in training the authors predict the glance with the GRU classifier (their train.py); only
    # their inference.py uses the encoder's head, which imported checkpoints keep
    preset = {
        "model": dict(arch=timm_name, classifier="recurrent", classifier_hidden=1024,
                      glance_head="classifier", policy_encoder="conv", policy_hidden=256,
                      glance_interpolation="bilinear", **_pretrained("pycls_in1k")),
        "data": _imagenet_data(),
        "train": _family(0.02, 5e-5, 1.0, True, 60),
    }
    return preset


def _cascaded(arch, max_steps, patch_size, data, stage1_epochs, tag, drop_rate):
    # the authors' train.py: dropout before the classifier and stochastic depth in the blocks
    regularisation = dict(drop_rate=drop_rate, drop_path_rate=0.2)
    return {
        "model": dict(arch=arch, classifier="cascaded", glance_head="encoder",
                      policy_encoder="conv", policy_hidden=256, glance_interpolation="bicubic",
                      max_steps=max_steps, patch_size=patch_size, encoder_kwargs=regularisation,
                      **_pretrained(tag)),
        "data": data,
        "train": _family(0.005, 1e-4, 5.0, False, stage1_epochs),
    }


_RESNET = _family(0.01, 1e-4, 1.0, True, 60)

PRESETS: dict[str, dict] = {
    # torchvision's ResNet/DenseNet weights (timm's *.tv_in1k), as the authors' encoders
    "resnet50": dict(_resnet_like("resnet50", "bicubic", "tv_in1k"), train=_RESNET),
    "densenet121": dict(_resnet_like("densenet121", "bilinear", "tv_in1k"), train=_RESNET),
    "densenet169": dict(_resnet_like("densenet169", "bilinear", "tv_in1k"), train=_RESNET),
    "densenet201": dict(_resnet_like("densenet201", "bilinear", "tv_in1k"), train=_RESNET),
    # the authors' names for RegNets; the encoders are timm's equivalents (pycls's weights)
    "regnety_600m": _regnet("regnety_006"),
    "regnety_800m": _regnet("regnety_008"),
    "regnety_1.6g": _regnet("regnety_016"),
    # Ross Wightman's weights, which the authors' 2019 gen-efficientnet code loaded
    "mobilenetv3_large_100": _cascaded("mobilenetv3_large_100", 3, 96, _imagenet_data(), 90,
                                       "ra_in1k", 0.2),
    "mobilenetv3_large_125": _cascaded("mobilenetv3_large_125", 3, 128, _imagenet_data(), 90,
                                       None, 0.2),
    "efficientnet_b2": _cascaded("efficientnet_b2", 4, 128,
                                 _imagenet_data(260, 0.875, "bicubic"), 30, "ra_in1k", 0.3),
    "efficientnet_b3": _cascaded("efficientnet_b3", 4, 128,
                                 _imagenet_data(300, 0.904, "bicubic"), 30, "ra2_in1k", 0.3),
    # the built-in demo: cluttered MNIST (canvas 100, 8 fragments), a 5-conv CNN, P 32, T 3
    "demo": {
        # no num_classes: the data gives it (10 for cluttered MNIST), so `--preset demo` also
        # trains on a folder of images
        "model": dict(arch="demo_cnn", in_chans=1, patch_size=32, max_steps=3,
                      classifier="recurrent", classifier_hidden=128, policy_encoder="conv",
                      policy_hidden=128, glance_interpolation="bilinear", glance_antialias=True,
                      # PPO scores a clamped location by the mass beyond the edge: over three
                      # seeds the same mean accuracy, the focus steps less spread across seeds
                      # (0.29 / 0.16 against 0.38 / 0.29 points at 100 x 100)
                      policy_action_scoring="clamped"),
        "data": dict(dataset="cluttered-mnist", image_size=100, canvas_size=100, num_clutter=8,
                     clutter_size=8, mean=[0.5], std=[0.5], train_canvases=20000,
                     test_canvases=5000),
        # sized for `glancefocus demo` on 2 CPU cores: bf16 and channels_last are the fastest
        # on CPUs with native bf16 (stage 1 step 104 ms vs 141 ms in float32; the static
        # baseline 287 ms vs 809 ms); AVX2-only CPUs emulate bf16, far slower, hence 'auto'.
        # Stage 3 keeps stage 1's learning rates, as the authors keep the backbone's
        "train": {
            "batch_size": 128,
            "amp": "auto",
            "channels_last": True,
            # each epoch's progress on 1,000 of the 5,000 test canvases (the demo then scores
            # all of them): 0.35 s instead of 1.7 s an epoch in float32 on 2 cores, about 15 s
            # of the run
            "eval_images": 1000,
            "stage1": dict(epochs=8, backbone_lr=0.05, classifier_lr=0.05, weight_decay=1e-4,
                           dsn_ratio=1.0, train_glance_encoder=True),
            "stage2": dict(epochs=1, updates=800, ppo_lr=3e-4),
            # the static baseline: 6 epochs at batch 32 (stage 1's learning rate) reach 96.78 %
            # in 357 s where 8 at batch 128 reach 96.64 % in 627 s (float32, 2 cores of an
            # AVX-512 EPYC; 96.80 % on an AVX2-only one): fewer, smaller steps that each cost
            # about 0.85x per image; 4 epochs at 128 / 64 / 32: 95.30 / 96.18 / 96.14 %, 5 at
            # 32: 96.18 %
            "static_epochs": 6,
            "static_batch_size": 32,
            "stage3": dict(epochs=5, backbone_lr=0.05, classifier_lr=0.05, weight_decay=1e-4,
                           dsn_ratio=1.0, train_glance_encoder=True),
            # `glancefocus demo --recipe one-stage`: the focus steps on half of each batch (the
            # half the glance is least sure of), falling to a fifth by the last epoch, make the
            # epochs cheaper, so the glance gets 11 epochs in about half the three stages' time,
            # and its loss weighs four times a focus step's (measured side by side: 92.42 / 97.00
            # / 97.60 % at seed 0, 92.36 / 96.60 / 97.34 % at seed 1, in 0.53x the three stages'
            # time; the share at 0.5 throughout and weight 3: 92.56 / 96.32 / 96.90 and 92.32 /
            # 97.12 / 97.86 % in 0.57x here, but 0.61-0.65x at 60 x 60)
            "one_stage": dict(epochs=11, backbone_lr=0.1, classifier_lr=0.1, weight_decay=1e-4,
                              dsn_ratio=1.0, train_glance_encoder=True, ppo_lr=3e-4,
                              random_fraction_start=0.5, random_fraction_end=0.0,
                              glance_loss_weight=4.0, focus_fraction=0.5,
                              focus_fraction_end=0.2),
        },
    },
}


def _transformer_stage(lr, epochs, warmup_epochs, **extra):
    """AdamW with warm-up, as vision transformers are trained (the authors' SGD stays for CNNs)."""
    return dict(optimizer="adamw", backbone_lr=lr, classifier_lr=lr, weight_decay=0.05,
                warmup_epochs=warmup_epochs, epochs=epochs, dsn_ratio=1.0,
                train_glance_encoder=True, **extra)


# The demo with a small ViT as both encoders (4 x 4 pixel patches: an 8 x 8 token map for the
# policy); the same data and schedule as the CNN demo, AdamW with one epoch of warm-up
PRESETS["demo_vit"] = copy.deepcopy(PRESETS["demo"])
PRESETS["demo_vit"]["model"].update(arch="demo_vit")
PRESETS["demo_vit"]["train"].update(
    stage1=_transformer_stage(1e-3, 8, 1), stage3=_transformer_stage(5e-4, 5, 1),
    one_stage=_transformer_stage(1e-3, 11, 1, ppo_lr=3e-4, random_fraction_start=0.5,
                                 random_fraction_end=0.0, glance_loss_weight=4.0,
                                 focus_fraction=0.5, focus_fraction_end=0.2))
# AdaptiveNN's setting (Nature Machine Intelligence 2025): DeiT-S as glance and focus
# encoders, a 112 x 112 glance of the whole image, 112 x 112 fixations at full resolution,
# glance + 4 fixations, 288 px inputs. The schedule (AdamW, 30 + 30 epochs from ImageNet
# weights, 5 of warm-up) is ours, not theirs (300 epochs at batch 512 on 8 GPUs)
PRESETS["deit_small_112"] = {
    "model": dict(arch="deit_small_patch16_224", classifier="recurrent", classifier_hidden=1024,
                  policy_encoder="conv", policy_hidden=256, patch_size=112, max_steps=5,
                  glance_interpolation="bicubic", **_pretrained("fb_in1k")),
    "data": _imagenet_data(288, 0.875, "bicubic"),
    "train": {"batch_size": 256, "stage1": _transformer_stage(5e-4, 30, 5),
              "stage2": dict(epochs=15), "stage3": _transformer_stage(1e-4, 30, 5),
              "one_stage": _transformer_stage(5e-4, 30, 5)},
}

# The authors' model names map onto timm encoders of other names.
AUTHORS_ARCH_TO_PRESET = {name: name for name in PRESETS
                          if name not in ("demo", "demo_vit", "deit_small_112")}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    """A deep copy of preset `name` (a partial RunConfig dict)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; presets: {', '.join(preset_names())}")
    return copy.deepcopy(PRESETS[name])


DEMO_CLASSES = 10
"""The built-in demo's data (cluttered MNIST) has ten classes, the digits."""
IMAGENET_CLASSES = 1000


def default_num_classes(arch: str) -> int:
    """The class count of a model built outside training when neither the caller nor the preset
    gives one (training reads it from the data): the demo presets' 10 digits, else ImageNet's
    1000."""
    on_digits = arch in PRESETS and PRESETS[arch]["data"].get("dataset") == "cluttered-mnist"
    return DEMO_CLASSES if on_digits else IMAGENET_CLASSES


def assumed_num_classes(config) -> int:
    """The class count to assume where no data is read (memory estimates, benchmarks): the
    digits' 10 for cluttered MNIST, else ImageNet's 1000."""
    return DEMO_CLASSES if config.data.dataset == "cluttered-mnist" else IMAGENET_CLASSES


def default_model_section(arch: str) -> dict:
    """The model section for `arch`: its preset's, or a sensible default for any timm CNN
    (recurrent head and the light 1x1-conv policy encoder, which fit any channel count)."""
    if arch in PRESETS:
        return get_preset(arch)["model"]
    return dict(arch=arch, classifier="recurrent", classifier_hidden=1024, policy_encoder="conv",
                policy_hidden=256, glance_interpolation="bicubic")


def model_config_for(arch: str, **overrides) -> ModelConfig:
    from .config import from_dict

    section = default_model_section(arch)
    section.update(overrides)
    return from_dict(ModelConfig, section, prefix="model.")
