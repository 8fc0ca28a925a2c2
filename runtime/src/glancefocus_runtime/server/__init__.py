"""`glancefocus-serve`: an exported GFNet behind HTTP, with dynamic batching and early exit."""
from .app import ServeConfig, create_app
from .batcher import Batcher

__all__ = ["Batcher", "ServeConfig", "create_app"]
