"""onnxruntime's execution providers by short or full name, with CPU as the fallback."""
from __future__ import annotations

import logging
import warnings
from typing import Optional, Sequence

log = logging.getLogger("glancefocus_runtime")

CPU = "CPUExecutionProvider"
SHORT_NAMES = {
    "cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider", "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider", "qnn": "QNNExecutionProvider",
}


class ProviderFallbackWarning(UserWarning):
    """An execution provider asked for is not available: the model runs on the next one."""


def provider_name(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full names pass through."""
    return SHORT_NAMES.get(name.strip().lower(), name.strip())


def session_providers(ort, wanted: Optional[Sequence[str]]) -> list[str]:
    """The providers to open sessions with: those asked for that this onnxruntime build has, in
    order, then CPU. One that is missing is left out with a ProviderFallbackWarning."""
    if isinstance(wanted, str):
        wanted = [wanted]
    available = ort.get_available_providers()
    chosen = []
    for name in map(provider_name, wanted or [CPU]):
        if name in available:
            chosen.append(name)
        else:
            warnings.warn(f"onnxruntime execution provider '{name}' is not available here "
                          f"(this onnxruntime has {', '.join(available)}): falling back to "
                          f"{CPU if not chosen else chosen[-1]}", ProviderFallbackWarning,
                          stacklevel=3)
    return list(dict.fromkeys(chosen + [CPU]))


def check_session_providers(session, chosen: list[str]) -> list[str]:
    """The providers a session really got (onnxruntime drops one that fails to load, e.g. CUDA
    without its libraries); a warning when the preferred one is not among them."""
    have = session.get_providers()
    if chosen and chosen[0] not in have:
        warnings.warn(f"onnxruntime could not start execution provider '{chosen[0]}' (the "
                      f"session runs on {', '.join(have)})", ProviderFallbackWarning, stacklevel=3)
    return list(have)
