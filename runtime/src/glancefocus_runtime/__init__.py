"""Early-exit inference on ONNX Runtime with numpy and PIL only: no PyTorch needed.

    from glancefocus.runtime import ExportedPredictor
    predictor = ExportedPredictor("exported/", budget=1.2e9)    # from `glancefocus export`
    answers = predictor.predict_images(["a.jpg", "b.jpg"])
    answers[0].label, answers[0].class_name, answers[0].confidence, answers[0].exit_step

The package of the `glancefocus-runtime` distribution (`pip install ./runtime`: onnxruntime,
numpy, Pillow and the HTTP server's libraries, no PyTorch), shipped by `glancefocus` too (there
it needs `pip install 'glancefocus[onnx]'`; without onnxruntime, using it, not importing it,
raises MissingDependencyError with that hint). `glancefocus-serve` (glancefocus_runtime.server)
serves an exported model over HTTP.
"""
from .exit_rule import BudgetAboveCurveWarning, BudgetOutOfRangeError, budget_index
from .images import IMAGE_EXTENSIONS, ImageReadError, ImageTooSmallError, Preprocess, load_image
from .manifest import ManifestError, load_manifest
from .onnx_deps import MissingDependencyError
from .pool import ExitPool, Finished
from .predictor import ExitBatch, ExportedModel, ExportedPredictor, Prediction
from .providers import ProviderFallbackWarning

__all__ = [
    "BudgetAboveCurveWarning", "BudgetOutOfRangeError", "ExitBatch", "ExitPool", "ExportedModel",
    "ExportedPredictor", "Finished", "IMAGE_EXTENSIONS", "ImageReadError", "ImageTooSmallError",
    "ManifestError", "MissingDependencyError", "Prediction", "Preprocess", "ProviderFallbackWarning", "budget_index",
    "load_image", "load_manifest",
]
