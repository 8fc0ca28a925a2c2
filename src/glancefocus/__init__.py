"""glancefocus: Glance and Focus Networks (GFNet) that glance, focus on a few patches, and stop
when confident.

The public names load on first use (PEP 562), so that `import glancefocus.runtime` (the ONNX
early-exit runtime) works where PyTorch is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
"""The release (pyproject.toml reads it from here; CHANGELOG.md says what changed)."""

# public name -> the submodule that defines it
_PUBLIC = {
    "CheckpointError": "checkpoint", "convert": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ConfigError": "config", "DataConfig": "config", "ModelConfig": "config",
    "RunConfig": "config", "TrainConfig": "config", "load_config": "config",
    "FocusSteps": "model", "GlanceFocusNet": "model", "GlanceFocusOutput": "model",
    "StepOutput": "model",
    "StepState": "model", "create_model": "model",
    "get_preset": "presets", "preset_names": "presets",
    "ImageTransform": "transforms", "create_transform": "transforms",
    "resolve_data_config": "transforms",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """A public name (imported from its submodule on first use) or a submodule."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # e.g. glancefocus.exits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .checkpoint import CheckpointError, convert, load_checkpoint, save_checkpoint
    from .config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
    from .model import (
        FocusSteps,
        GlanceFocusNet,
        GlanceFocusOutput,
        StepOutput,
        StepState,
        create_model,
    )
    from .presets import get_preset, preset_names
    from .transforms import ImageTransform, create_transform, resolve_data_config
