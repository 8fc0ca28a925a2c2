"""Does the exported model answer as PyTorch does? Per-step logits and early-exit answers of
glancefocus.runtime (onnxruntime) against the PyTorch model, on the same images.

    python benchmarks/onnx_parity.py [--model demo|resnet50|all] [--checkpoint CKPT]
                                     [--images 1000] [--threads N] [--json FILE]

demo: the checkpoint given, else demo-out/model.pt if present, else an untrained demo preset, on
cluttered-MNIST test canvases. resnet50: the resnet50 preset with random weights at 224 px, on
random smooth images (as benchmarks/early_exit.py). Checks:

- every step's logits: the largest absolute difference between the exported step graphs run one
  after the other by onnxruntime and model.step in PyTorch (float32; goal 1e-4), and whether the
  boxes looked at are the same;
- early exit at 5 budgets (q = 0.1, 0.25, 0.5, 1.0, 1.5 of the authors' protocol; thresholds from
  the checkpoint's calibrated curve, else calibrated on separate images): the label and exit step
  of every image from ExportedPredictor.run against Predictor.run (goal: identical).

Prints (and with --json writes) one JSON object; "holds" says whether both goals hold.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from early_exit import (  # noqa: E402
    all_step_logits,
    batches,
    budget_thresholds,
    demo_setup,
    resnet50_setup,
)

from glancefocus.atomic import write_json  # noqa: E402
from glancefocus.export import export_onnx  # noqa: E402
from glancefocus.predictor import Predictor  # noqa: E402
from glancefocus.runtime import ExportedModel, ExportedPredictor  # noqa: E402

BUDGET_RATIOS = (0.1, 0.25, 0.5, 1.0, 1.5)
LOGIT_TOLERANCE = 1e-4


def torch_steps(model, chunk: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-step logits [T, B, K] and boxes [T, B, 4] of the model's full pass (model.step, step
    after step)."""
    with torch.inference_mode():
        out = model(chunk)
    return out.logits.float().numpy(), out.boxes.numpy()


def onnx_steps(exported: ExportedModel, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, boxes, state = [], [], None
    for step in range(1, exported.max_steps + 1):
        outputs = exported.step(step, array, state)
        logits.append(outputs["logits"])
        boxes.append(outputs["box"])
        state = {name: outputs[f"next_{name}"] for name in exported.state_axis}
    return np.stack(logits), np.stack(boxes)


def parity(model, images, calibration, source: str, batch_size: int) -> dict:
    model.eval()
    chunks = batches(images, batch_size)
    arrays = [chunk.numpy() for chunk in chunks]
    with tempfile.TemporaryDirectory(prefix="gf-parity-") as folder:
        manifest = export_onnx(model, folder, image_size=images.shape[-1])
        exported = ExportedModel(folder, threads=torch.get_num_threads())
        report = {"source": source, "images": int(images.shape[0]), "batch_size": batch_size,
                  "exporter": manifest.get("exporter"), "max_steps": model.config.max_steps}

        want = [torch_steps(model, chunk) for chunk in chunks]
        got = [onnx_steps(exported, array) for array in arrays]
        want_logits = np.concatenate([w[0] for w in want], axis=1)
        got_logits = np.concatenate([g[0] for g in got], axis=1)
        # boxes [T, B, 4]: an image whose box differs at any step
        boxes_differ = np.concatenate([(w[1] != g[1]).any(axis=(0, 2)) for w, g in zip(want, got)])
        per_step = np.abs(want_logits - got_logits).reshape(model.config.max_steps, -1).max(1)
        report["logits_max_abs_difference_per_step"] = [float(v) for v in per_step]
        report["boxes_differing_images"] = int(boxes_differ.sum())
        report["boxes_identical"] = not bool(boxes_differ.any())

        calibration_logits = all_step_logits(model, batches(calibration, batch_size))
        report["budgets"] = []
        for q, thresholds, how, _ in budget_thresholds(model, BUDGET_RATIOS, calibration_logits):
            torch_predictor = Predictor(model, thresholds=thresholds)
            onnx_predictor = ExportedPredictor(exported, thresholds=[float(t) for t in thresholds])
            with torch.inference_mode():
                expected = [torch_predictor.run(chunk) for chunk in chunks]
            answers = [onnx_predictor.run(array) for array in arrays]
            labels_t = torch.cat([r.labels for r in expected]).numpy()
            steps_t = torch.cat([r.exit_steps for r in expected]).numpy()
            labels_o = np.concatenate([r.labels for r in answers])
            steps_o = np.concatenate([r.exit_steps for r in answers])
            differ = (labels_t != labels_o) | (steps_t != steps_o)
            report["budgets"].append({
                "budget_q": q, "thresholds_from": how,
                "thresholds": [round(float(t), 8) for t in thresholds],
                "exit_share": (np.bincount(steps_t - 1, minlength=model.config.max_steps)
                               / len(steps_t)).tolist(),
                "differing_images": int(differ.sum()),
                "identical": not bool(differ.any())})
    report["holds"] = bool(max(report["logits_max_abs_difference_per_step"]) <= LOGIT_TOLERANCE
                           and report["boxes_identical"]
                           and all(b["identical"] for b in report["budgets"]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "resnet50", "all"), default="all")
    parser.add_argument("--checkpoint", default=None, help="a demo checkpoint")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--demo-batch-size", type=int, default=250)
    parser.add_argument("--resnet-batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "logit_tolerance": LOGIT_TOLERANCE, "models": {}}
    if args.model in ("demo", "all"):
        model, images, _, calibration, source = demo_setup(args.checkpoint, args.images, args.seed)
        report["models"]["demo"] = parity(model, images, calibration, source,
                                          args.demo_batch_size)
    if args.model in ("resnet50", "all"):
        model, images, _, calibration, source = resnet50_setup(args.images, args.seed)
        report["models"]["resnet50"] = parity(model, images, calibration, source,
                                              args.resnet_batch_size)
    report["holds"] = all(m["holds"] for m in report["models"].values())
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
