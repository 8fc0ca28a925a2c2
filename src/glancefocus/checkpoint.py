"""Checkpoints: the native format, and import of the authors' released `*.pth.tar` files.

Native checkpoints are `torch.save` files of tensors and plain containers only, read back with
`torch.load(weights_only=True)`: loading one never executes pickled code. They carry everything
needed to use the model: the resolved config, the weights, the MACs table, the class names, the
calibrated exit thresholds and metrics (and, for a training run, the state to resume from).

The authors' files are full pickles made with PyTorch 1.3. Unpickling can run arbitrary code, so
they are read only on explicit request (`trust_pickle=True`, `--trust-pickle`).
"""
from __future__ import annotations

import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import WriteFailed, atomic_path
from .config import ModelConfig, from_dict, to_dict

FORMAT = "glancefocus-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe to read, or does not fit."""


# ----------------------------------------------------------------------------------------------
# native format

def checkpoint_dict(model, run_config: Optional[dict] = None, training: Optional[dict] = None) -> dict:
    config = dict(run_config or {})
    config["model"] = to_dict(model.config)
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "macs": model.macs(),
        "class_names": list(model.class_names) if model.class_names else None,
        "exit_curve": model.exit_curve,
        "metrics": dict(model.metrics),
        "pretrained_glance_head": bool(model.pretrained_glance_head),
        "training": training,
    }


def save_checkpoint(model, path, run_config: Optional[dict] = None,
                    training: Optional[dict] = None) -> None:
    """Write `model` (and optionally a run config and training state) to `path`, atomically."""
    payload = checkpoint_dict(model, run_config, training)
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk this way
            free = shutil.disk_usage(tmp.parent).free
            raise WriteFailed(f"cannot write '{path}': writing failed with {free:,} bytes "
                              "free on its disk (is it full?)") from exc


def read_checkpoint(path, trust_pickle: bool = False) -> dict:
    """The raw dict of a native checkpoint, or of an authors' file (with `trust_pickle`)."""
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not file.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    try:
        with warnings.catch_warnings():
            # torch warns about protocols of plain pickles before it refuses them: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused something: a full pickle (the authors' files, or a crafted one)
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint '{path}' is a full Python pickle, not a glancefocus checkpoint; "
                "loading it could run code stored in it. If it is an authors' GFNet release file "
                "you trust, pass trust_pickle=True (command line: --trust-pickle), or convert it "
                "once with `glancefocus convert --trust-pickle SRC DST`."
                f" (detail: {str(exc).splitlines()[0]})") from None
        data = _load_trusted_pickle(file)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read: truncated or not a "
                              f"checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(data).__name__}, not a checkpoint dict")
    if data.get("format") == FORMAT:
        return data
    if "model_prime_state_dict" in data:
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint '{path}' is an authors' GFNet file (a PyTorch 1.3 pickle); read it "
                "only if you trust it: trust_pickle=True / --trust-pickle")
        return data
    raise CheckpointError(f"checkpoint '{path}' is not a glancefocus checkpoint nor an authors' "
                          f"GFNet file (top-level keys: {sorted(map(str, data))[:8]})")


def _load_trusted_pickle(file: Path) -> Any:
    warnings.warn(f"unpickling '{file}' with trust_pickle=True: this can run code stored in the "
                  "file; do it only for files from a source you trust", stacklevel=3)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{file}' cannot be read: {type(exc).__name__}: {exc}") from None


def load_checkpoint(path, trust_pickle: bool = False, map_location="cpu"):
    """A ready GlanceFocusNet (in eval mode) from a native checkpoint or an authors' file."""
    data = read_checkpoint(path, trust_pickle=trust_pickle)
    return model_from_checkpoint_dict(data, path).to(map_location).eval()


def model_from_checkpoint_dict(data: dict, path="<checkpoint>"):
    """The model of a raw dict from read_checkpoint: native, or an authors' release file."""
    if data.get("format") == FORMAT:
        return model_from_native(data, path)
    return import_authors_checkpoint(data, source=str(path))


def model_from_native(data: dict, path="<checkpoint>"):
    from .model import GlanceFocusNet

    try:
        config = from_dict(ModelConfig, dict(data["config"]["model"], pretrained=False), prefix="model.")
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' has no usable model config ({exc})") from None
    model = GlanceFocusNet(config)
    load_state_checked(model, data["state_dict"], path)
    model.class_names = data.get("class_names")
    model.exit_curve = data.get("exit_curve")
    model.metrics = dict(data.get("metrics") or {})
    model.run_config = data.get("config")
    model.pretrained_glance_head = bool(data.get("pretrained_glance_head", False))
    return model


def load_state_checked(model, state: dict, path="<checkpoint>") -> None:
    """Load weights, turning shape and key mismatches into a message that says what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k, theirs, ours = wrong[0]
            parts.append(f"{len(wrong)} tensors of another shape, e.g. '{k}' is {theirs} in the file "
                         f"but {ours} for {model.config.arch} with {model.config.num_classes} classes")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'")
        raise CheckpointError(f"checkpoint '{path}' does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def check_compatible(data: dict, model_config: ModelConfig, path="<checkpoint>") -> None:
    """Refuse a checkpoint made for another architecture, class count, patch size or step count."""
    stored = data.get("config", {}).get("model", {})
    for field in ("arch", "num_classes", "patch_size", "max_steps", "classifier", "in_chans"):
        ours, theirs = getattr(model_config, field), stored.get(field)
        if theirs != ours:
            raise CheckpointError(f"checkpoint '{path}' was made for model.{field}={theirs!r}, "
                                  f"but this run has model.{field}={ours!r}")


# ----------------------------------------------------------------------------------------------
# the authors' release

# pre-0.3 torchvision DenseNets named layers 'norm.1'; today's and the release's say 'norm1'
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")

# pycls RegNet names -> timm RegNet names
_PYCLS_TO_TIMM = [
    (re.compile(r"^(s\d+\.b\d+)\.proj\."), r"\1.downsample.conv."),
    (re.compile(r"^(s\d+\.b\d+)\.bn\."), r"\1.downsample.bn."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.a\."), r"\1.conv1.conv."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.a_bn\."), r"\1.conv1.bn."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.b\."), r"\1.conv2.conv."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.b_bn\."), r"\1.conv2.bn."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.se\.f_ex\.0\."), r"\1.se.fc1."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.se\.f_ex\.2\."), r"\1.se.fc2."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.c\."), r"\1.conv3.conv."),
    (re.compile(r"^(s\d+\.b\d+)\.f\.c_bn\."), r"\1.conv3.bn."),
    (re.compile(r"^fc\."), "head.fc."),
]


def _strip_module(state: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _authors_backbone_state(state: dict, backbone, arch: str, which: str) -> dict:
    """Map one of the release's encoder state dicts onto our timm backbone's names."""
    state = _strip_module(state)
    own = backbone.state_dict()
    renamed = {}
    for key, value in state.items():
        match = _OLD_DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if arch.startswith("regnet"):
            for pattern, repl in _PYCLS_TO_TIMM:
                key = pattern.sub(repl, key)
        renamed[key] = value
    # tensors only the file has (e.g. BatchNorm counters) are dropped; anything we need must exist
    missing = [k for k in own if k not in renamed and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"authors' {which}: {len(missing)} encoder tensors not found for "
                              f"{arch}, e.g. '{missing[0]}'")
    out = {}
    for key, value in own.items():
        if key in renamed:
            if tuple(renamed[key].shape) != tuple(value.shape):
                raise CheckpointError(f"authors' {which}: '{key}' is {tuple(renamed[key].shape)} "
                                      f"in the file but {tuple(value.shape)} in {arch}")
            out[key] = renamed[key]
        else:
            out[key] = value  # a counter absent from PyTorch 1.3 files
    return out


def import_authors_checkpoint(raw: dict, source: str = "<authors' checkpoint>"):
    """A GlanceFocusNet from the authors' release dict (their GFNet-Pytorch repository's *.pth.tar)."""
    from .model import create_model
    from .presets import AUTHORS_ARCH_TO_PRESET

    arch = raw.get("model_name")
    if arch not in AUTHORS_ARCH_TO_PRESET:
        raise CheckpointError(f"'{source}': model_name {arch!r} is not one of the authors' "
                              f"configurations ({', '.join(sorted(AUTHORS_ARCH_TO_PRESET))})")
    fc = _strip_module(raw["fc"])
    head_weight = fc.get("fc.weight", fc.get("fc_2.weight"))
    if head_weight is None:
        raise CheckpointError(f"'{source}': the classifier ('fc') has neither fc.* nor fc_2.* weights")
    max_steps = len(raw["flops"])
    # their inference.py predicts the glance of a RegNet with the encoder's own head (their
    # training used the GRU classifier, as our RegNet presets do)
    extra = {"glance_head": "encoder"} if arch.startswith("regnet") else {}
    model = create_model(AUTHORS_ARCH_TO_PRESET[arch], num_classes=int(head_weight.shape[0]),
                         patch_size=int(raw["patch_size"]), max_steps=max_steps, **extra)
    state = {}
    for prefix, key in (("glance_encoder", "model_prime_state_dict"), ("focus_encoder", "model_state_dict")):
        backbone = getattr(model, prefix).backbone
        mapped = _authors_backbone_state(raw[key], backbone, arch, key)
        state.update({f"{prefix}.backbone.{k}": v for k, v in mapped.items()})
    own = model.state_dict()
    # the release's cascaded head always holds fc_2..fc_5; keep the steps this model has
    state.update({f"classifier.{k}": v for k, v in fc.items() if f"classifier.{k}" in own})
    state.update({f"policy.{k}": v for k, v in _strip_module(raw["policy"]).items()})
    load_state_checked(model, state, source)
    model.metrics = _authors_metrics(raw)
    model.exit_curve = _authors_exit_curve(raw, max_steps)
    model.pretrained_glance_head = True  # their glance encoders keep their ImageNet heads
    return model


def _plain(value):
    """Tensors, numpy values and nested lists as plain Python floats (safe to store)."""
    if hasattr(value, "tolist"):  # torch and numpy
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value)


def _authors_metrics(raw: dict) -> dict:
    metrics = {"source": "authors' release"}
    if "anytime_classification" in raw:
        metrics["anytime_top1"] = _plain(raw["anytime_classification"])
    for key in ("flops", "model_flops", "policy_flops", "fc_flops"):
        if key in raw:
            metrics[f"authors_{key}"] = _plain(raw[key])
    return metrics


def _authors_exit_curve(raw: dict, max_steps: int) -> Optional[dict]:
    if "dynamic_threshold" not in raw:
        return None
    thresholds = torch.as_tensor(raw["dynamic_threshold"], dtype=torch.float32).reshape(-1, max_steps)
    curve = {"budgets": [p / 20 for p in range(1, thresholds.shape[0] + 1)],
             "thresholds": thresholds.tolist(), "source": "authors' release"}
    budgeted = raw.get("budgeted_batch_classification")
    if budgeted is not None and len(budgeted) == 2:
        curve["macs"] = _plain(budgeted[0])
        curve["accuracy"] = _plain(budgeted[1])
    return curve


def convert(src, dst, trust_pickle: bool = False) -> Any:
    """Read `src` (an authors' file or a native checkpoint) and write a native checkpoint."""
    model = load_checkpoint(src, trust_pickle=trust_pickle)
    save_checkpoint(model, dst)
    return model
