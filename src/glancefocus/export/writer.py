"""Export a GFNet to ONNX: one static graph per step (dynamic batch axis) and manifest.json.

The early-exit loop (threshold test, dropping exited images, the next step) stays outside the
graphs, in `glancefocus_runtime`. A recurrent classifier needs two graphs (glance.onnx, and
focus.onnx shared by steps 2..T); a cascaded one a graph per focus step, since each step has its
own linear head and a longer state.

Every graph is checked with onnx.checker and then run by onnxruntime on a batch of a size it
was not traced at, against the same step in PyTorch: an export whose outputs differ is refused
(ExportError), never written as a silently wrong graph.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from glancefocus_runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
from glancefocus_runtime.onnx_deps import require_onnx

from .steps import STATE_NAMES, FocusGraph, GlanceGraph

OPSET = 18
TRACE_BATCH = 2     # the example batch the graphs are traced with
CHECK_BATCH = 3     # another batch size: the check also proves the batch axis is dynamic
# exported and PyTorch outputs must agree to this (|diff| <= ATOL + RTOL * |PyTorch|)
ATOL, RTOL = 1e-4, 1e-4


class ExportError(ValueError):
    """The model cannot be exported faithfully; the message says why."""


def export_onnx(model, out_dir: Union[str, Path], image_size: Optional[int] = None,
                source: Optional[str] = None) -> dict:
    """Write OUT_DIR/{glance,focus*}.onnx and OUT_DIR/manifest.json; return the manifest.

    model: a GlanceFocusNet (copied: it is not changed). image_size: the side of the square
    input the graphs take (default: the model's data config's, what create_transform makes).
    source: where the model came from, recorded in the manifest (e.g. the checkpoint's path).
    """
    onnx, ort = require_onnx()
    from ..transforms import create_transform

    data = create_transform(model).data
    size = int(image_size or data.image_size)
    patch = model.config.patch_size
    if size < patch:
        raise ExportError(f"--image-size {size} is smaller than the model's patch size {patch}")
    model = copy.deepcopy(model).float().cpu().eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier export's manifest goes first: a failure below must not leave it pointing at
    # graphs this export replaced (the manifest is written last, when everything checked out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(CHECK_BATCH, model.config.in_chans, size, size, generator=generator)

    exporters, graphs, steps = set(), {}, []
    glance = GlanceGraph(model, size, size).eval()
    exporters.add(_export(glance, "glance.onnx", out, images[:TRACE_BATCH], size))
    graphs["glance.onnx"] = glance
    steps.append("glance.onnx")
    for step in range(2, model.config.max_steps + 1):
        name = "focus.onnx" if model.config.classifier == "recurrent" else f"focus_{step}.onnx"
        if name not in graphs:
            focus = FocusGraph(model, size, size, step).eval()
            example = _focus_inputs(graphs, steps, images[:TRACE_BATCH])
            exporters.add(_export(focus, name, out, example, size))
            graphs[name] = focus
        steps.append(name)
    for name in graphs:
        onnx.checker.check_model(str(out / name), full_check=True)
    largest_diff = _check_against_torch(graphs, steps, images, out, ort)

    manifest = _manifest(model, data, size, steps, sorted(exporters), largest_diff, source)
    _write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------
# exporting one graph

def _input_names(graph) -> list[str]:
    return ["images"] if isinstance(graph, GlanceGraph) else ["images", *STATE_NAMES]


def _output_names(graph) -> list[str]:
    extra = [] if isinstance(graph, GlanceGraph) else ["location"]
    # an output may not share an input's name: the next state is next_<name>
    return ["logits", *(f"next_{name}" for name in STATE_NAMES), *extra, "box"]


def _batch_axes(graph) -> dict:
    """The batch axis of every input and output: dim 1 of GRU states [1, B, H], else dim 0."""
    axes = {}
    recurrent = graph.model.config.classifier == "recurrent"
    for name in _input_names(graph) + _output_names(graph):
        state = name.removeprefix("next_")
        gru_like = state == "policy_hidden" or (state == "classifier_state" and recurrent)
        axes[name] = {1 if gru_like else 0: "batch"}
    return axes


def _export(graph, name: str, out: Path, example: tuple, size: int,
            signature: Optional[tuple] = None, arch: Optional[str] = None) -> str:
    """Export `graph` to out/name: torch's current (dynamo) exporter first, the TorchScript
    exporter when that one fails. Returns which one wrote it. signature: (input names, output
    names, batch axes), by default a GFNet step's."""
    target = out / name
    temporary = out / f".{name}.tmp"
    failures = []
    for exporter in ("dynamo", "torchscript"):
        try:
            _run_exporter(graph, example, temporary, exporter, signature)
            os.replace(temporary, target)
            return exporter
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next, then refuse
            failures.append(f"{exporter}: {type(exc).__name__}: {_first_line(exc)}")
        finally:
            temporary.unlink(missing_ok=True)
    arch = arch or graph.model.config.arch
    raise ExportError(f"cannot export the {name.removesuffix('.onnx')} step of model.arch "
                      f"'{arch}' to ONNX (opset {OPSET}, {size}x{size} input): "
                      + "; ".join(failures))


def _run_exporter(graph, example: tuple, path: Path, exporter: str,
                  signature: Optional[tuple] = None) -> None:
    input_names, output_names, axes = signature or (_input_names(graph), _output_names(graph),
                                                    _batch_axes(graph))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracing notes
        if exporter == "dynamo":
            torch.onnx.export(graph, example, str(path), dynamo=True, external_data=False,
                              opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, verbose=False)
        else:
            torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, do_constant_folding=True)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _focus_inputs(graphs: dict, steps: list, images: torch.Tensor) -> tuple:
    """The inputs of the next focus step: the state after running `steps` in PyTorch."""
    with torch.no_grad():
        outputs = graphs[steps[0]](images)
        for name in steps[1:]:
            outputs = graphs[name](images, *outputs[1:4])
    return (images, *outputs[1:4])


# ----------------------------------------------------------------------------------------------
# checking the graphs against PyTorch

def _check_against_torch(graphs: dict, steps: list, images: torch.Tensor, out: Path, ort) -> float:
    """Run every step in PyTorch and in onnxruntime on the same inputs (a batch size that was
    not traced); refuse the export if any output differs. Returns the largest logit difference."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(out / name), options,
                                           providers=["CPUExecutionProvider"]) for name in graphs}
    largest, state = 0.0, None
    for step, name in enumerate(steps, start=1):
        inputs = (images,) if state is None else (images, *state)
        with torch.no_grad():
            expected = [t.numpy() for t in graphs[name](*inputs)]
        feed = {key: value.numpy() for key, value in zip(_input_names(graphs[name]), inputs)}
        got = sessions[name].run(None, feed)
        for key, want, have in zip(_output_names(graphs[name]), expected, got):
            _compare(key, step, want, have, name)
        largest = max(largest, float(np.abs(expected[0] - got[0]).max()))
        state = [torch.from_numpy(a) for a in expected[1:4]]
    return largest


def _compare(key: str, step: int, want: np.ndarray, have: np.ndarray, name: str) -> None:
    if want.shape != have.shape:
        raise ExportError(f"{name}: output '{key}' at step {step} has shape {have.shape} in "
                          f"onnxruntime but {want.shape} in PyTorch: the graph is wrong, not written")
    if want.dtype.kind in "iu":
        ok, diff = np.array_equal(want, have), "not equal"
    else:
        ok = np.allclose(have, want, atol=ATOL, rtol=RTOL)
        diff = f"differs by up to {float(np.abs(have - want).max()):.3g}"
    if not ok:
        raise ExportError(f"{name}: output '{key}' at step {step} {diff} between onnxruntime and "
                          f"PyTorch (allowed: {ATOL} + {RTOL} x |value|): the export is refused")


# ----------------------------------------------------------------------------------------------
# the manifest

def _manifest(model, data, size: int, steps: list, exporters: list, largest_diff: float,
              source: Optional[str]) -> dict:
    config = model.config
    recurrent = config.classifier == "recurrent"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "exporter": exporters[0] if len(exporters) == 1 else exporters,
        "opset": OPSET,
        "torch_version": torch.__version__,
        "arch": config.arch,
        "num_classes": config.num_classes,
        "class_names": list(model.class_names) if model.class_names else None,
        "patch_size": config.patch_size,
        "max_steps": config.max_steps,
        "classifier": config.classifier,
        "input": {"channels": config.in_chans, "height": size, "width": size},
        "preprocessing": {
            "mode": "RGB" if config.in_chans == 3 else "L",
            # another input size than the data config's keeps its resize-to-crop ratio
            "resize_size": round(size * data.resize_size / data.image_size),
            "image_size": size,
            "interpolation": data.interpolation,
            "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std],
            "small_images": data.small_images,
        },
        "steps": [{"step": k, "graph": name} for k, name in enumerate(steps, start=1)],
        "state_batch_axis": {"feature_map": 0, "classifier_state": 1 if recurrent else 0,
                             "policy_hidden": 1},
        "macs_per_step": _macs_per_step(model),
        "exit_curve": model.exit_curve or None,
        "check": {"batch": CHECK_BATCH, "max_abs_logit_difference": largest_diff,
                  "atol": ATOL, "rtol": RTOL},
    }


def _macs_per_step(model) -> list[int]:
    """Cumulative MACs of 1..T steps (glancefocus.macs)."""
    return [int(m) for m in model.macs()["per_step"]]


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
