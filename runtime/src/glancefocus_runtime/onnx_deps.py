"""The optional ONNX packages, imported on first use with a one-line error when missing."""
from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'glancefocus[onnx]'"


class MissingDependencyError(ValueError):
    """An optional package that this feature needs is not installed."""


def require(module: str, feature: str):
    """Import `module`, or raise MissingDependencyError naming the feature and the install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the '{module}' package, which cannot be imported here "
            f"({type(exc).__name__}: {exc}): {INSTALL_HINT}") from None


def require_onnxruntime():
    return require("onnxruntime", "the ONNX early-exit runtime")


def require_onnx():
    """(onnx, onnxruntime): export writes graphs with the first and checks them with the second."""
    return require("onnx", "ONNX export"), require("onnxruntime", "ONNX export")
