"""glancefocus: Glance and Focus Networks (GFNet) that glance, focus on a few patches, and stop
when confident."""
from .checkpoint import CheckpointError, convert, load_checkpoint, save_checkpoint
from .config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from .model import GlanceFocusNet, GlanceFocusOutput, StepOutput, StepState, create_model
from .presets import get_preset, preset_names

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataConfig", "GlanceFocusNet", "GlanceFocusOutput",
    "ModelConfig", "RunConfig", "StepOutput", "StepState", "TrainConfig", "convert",
    "create_model", "get_preset", "load_checkpoint", "load_config", "preset_names",
    "save_checkpoint",
]
