"""Early-exit inference on ONNX Runtime with numpy and PIL only: no PyTorch needed.

    from glancefocus.runtime import ExportedPredictor
    predictor = ExportedPredictor("exported/", budget=1.2e9)    # from `glancefocus export`
    answers = predictor.predict_images(["a.jpg", "b.jpg"])
    answers[0].label, answers[0].class_name, answers[0].confidence, answers[0].exit_step

Needs `pip install 'glancefocus[onnx]'` (onnxruntime); without it, using it (not importing it)
raises MissingDependencyError with that hint.
"""
from .exit_rule import BudgetAboveCurveWarning, BudgetOutOfRangeError, budget_index
from .images import IMAGE_EXTENSIONS, ImageReadError, ImageTooSmallError, Preprocess, load_image
from .manifest import ManifestError, load_manifest
from .onnx_deps import MissingDependencyError
from .predictor import ExitBatch, ExportedModel, ExportedPredictor, Prediction

__all__ = [
    "BudgetAboveCurveWarning", "BudgetOutOfRangeError", "ExitBatch", "ExportedModel",
    "ExportedPredictor", "IMAGE_EXTENSIONS", "ImageReadError", "ImageTooSmallError",
    "ManifestError", "MissingDependencyError", "Prediction", "Preprocess", "budget_index",
    "load_image", "load_manifest",
]
