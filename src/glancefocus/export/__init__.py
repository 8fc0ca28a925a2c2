"""Export a GFNet for deployment: ONNX graphs of its steps plus a JSON manifest, run by
`glancefocus.runtime` without PyTorch (see docs/deployment.md)."""
from .writer import ExportError, export_onnx

__all__ = ["ExportError", "export_onnx"]
