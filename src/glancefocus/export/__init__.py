"""Export a GFNet for deployment: ONNX graphs of its steps plus a JSON manifest, run by
`glancefocus_runtime` without PyTorch (see docs/deployment.md)."""
from .static import STATIC_FORMAT, export_static_onnx
from .writer import ExportError, export_onnx

__all__ = ["ExportError", "STATIC_FORMAT", "export_onnx", "export_static_onnx"]
