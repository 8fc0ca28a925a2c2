"""Does early exit really save time? Images per second and MACs per image, on the same images, for

  (a) every step for every image (how the authors evaluate: model.forward, exits simulated later),
  (b) real early exit (predictor.Predictor) at several budgets,
  (c) the static baseline: the same backbone on the whole image.

    python benchmarks/early_exit.py [--model demo|resnet50|all] [--checkpoint CKPT] [--json FILE]
                                    [--repeats 3] [--threads N] [--channels-last]
                                    [--engine torch|onnx|both] [--batch1-images 64]

demo: the checkpoint given, else demo-out/model.pt (from `glancefocus demo`) if present, else an
untrained demo preset; cluttered-MNIST test canvases at the model's data config; batch 256.
resnet50: random weights at 224 px, random images; batch 64. Thresholds: the checkpoint's
calibrated curve when it has one (budgets picked by MACs), else calibrated on the benchmark
images' all-steps outputs on separate calibration images (so no benchmark image sits exactly on
a threshold, where the two engines' last-bit differences could decide). Timing: CPU,
torch.inference_mode, one warm-up round, then `repeats` rounds that run every variant in turn
(so a change of machine load hits all of them alike); the median round counts.
Prints (and with --json writes) one JSON object; per budget: budget, accuracy, macs_per_image,
images_per_second, macs_speedup and time_speedup (both relative to (a)), and their ratio.

--engine: torch (PyTorch eager), onnx (the model exported with glancefocus.export and run by
glancefocus_runtime on onnxruntime, with as many threads as torch) or both. One engine: each
model's report is the format above plus "engine" (and, for onnx, "matches_torch" per budget:
labels and exit steps equal to the PyTorch predictor's). Both: {"torch": ..., "onnx": ...,
"onnx_over_torch_images_per_second": ...} per model, every variant of both engines timed in the
same interleaved rounds. Either way, when onnxruntime is installed, "batch_1" holds images/s of
both engines on single images (the serving case): every step, and early exit at q = 0.5.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glancefocus import create_model, exits, load_checkpoint
from glancefocus.atomic import write_json
from glancefocus.config import DataConfig, from_dict
from glancefocus.data.cluttered_mnist import ClutteredMNIST
from glancefocus.evaluate import data_config_for
from glancefocus.macs import count_static_macs
from glancefocus.predictor import Predictor

BUDGET_RATIOS = (0.1, 0.25, 0.5, 1.0)
"""q of the budgets benchmarked (the authors' protocol: the share exiting at step k is proportional to
q ** k): 0.1 sends most images out at the glance, 1.0 spreads them evenly over the steps."""


# ----------------------------------------------------------------------------------------------
# models and images

CALIBRATION_IMAGES = 256


def demo_setup(checkpoint, images: int, seed: int):
    """(model, images, labels, calibration images, where the model came from)."""
    path = checkpoint or ("demo-out/model.pt" if Path("demo-out/model.pt").is_file() else None)
    if path:
        model = load_checkpoint(path)
        source = f"checkpoint {path}"
        data = data_config_for(model.run_config or {"model": {"arch": model.config.arch}})
    else:
        torch.manual_seed(seed)
        model = create_model("demo").eval()
        source = "untrained demo preset (no demo-out/model.pt): accuracy is chance level"
        data = data_config_for({"model": {"arch": "demo_cnn"}})
    if data.dataset != "cluttered-mnist":
        raise SystemExit(f"the demo benchmark needs a cluttered-MNIST model, {path} has {data.dataset}")
    section = {k: getattr(data, k) for k in DataConfig.__dataclass_fields__}
    section.update(test_canvases=images + CALIBRATION_IMAGES)
    canvases = ClutteredMNIST(from_dict(DataConfig, section), "test", channels=model.config.in_chans)
    pixels = torch.stack([canvases[i][0] for i in range(len(canvases))])
    labels = canvases.labels.clone()
    return model, pixels[:images], labels[:images], pixels[images:], source


def resnet50_setup(images: int, seed: int):
    torch.manual_seed(seed)
    model = create_model("resnet50").eval()
    g = torch.Generator().manual_seed(seed)
    calibration = min(CALIBRATION_IMAGES, images)
    images += calibration
    # smooth random structure plus noise, so that images differ in more than noise
    coarse = torch.nn.functional.interpolate(torch.rand(images, 3, 7, 7, generator=g), size=224,
                                             mode="bilinear", align_corners=False)
    pixels = (coarse * 4 - 2) + 0.3 * torch.randn(images, 3, 224, 224, generator=g)
    labels = torch.randint(1000, (images,), generator=g)
    n = images - calibration
    return (model, pixels[:n], labels[:n], pixels[n:],
            "random weights, random images: accuracy is chance level")


# ----------------------------------------------------------------------------------------------
# measuring

def batches(images: torch.Tensor, batch_size: int):
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def all_step_logits(model, chunks) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk).logits for chunk in chunks], dim=1)


def budget_thresholds(model, ratios, calibration_logits) -> list:
    """[(q, thresholds, how they were chosen, the curve's MACs per image or None)] for `ratios`
    of the authors' budgets: the checkpoint's calibrated curve, else calibrated (once) on
    `calibration_logits`."""
    curve = model.exit_curve if model.exit_curve and model.exit_curve.get("macs") else None
    calibrated = None if curve else exits.calibrate_budgets(
        exits.confidences_from_logits(calibration_logits)[0])
    chosen = []
    for q in ratios:
        index = round(q * 20) - 1
        if curve is not None:
            budget = curve["macs"][index]
            chosen.append((q, Predictor(model, budget=budget).thresholds,
                           "the checkpoint's calibrated curve (glancefocus evaluate)", budget))
        else:
            chosen.append((q, calibrated[index], f"calibrated on {calibration_logits.shape[1]} "
                           "other images' all-steps outputs", None))
    return chosen


def choose_thresholds(model, logits, labels, step_macs, calibration_logits):
    """[(q, thresholds, how they were chosen, the MACs per image they aim at)] for BUDGET_RATIOS."""
    conf, pred = exits.confidences_from_logits(logits)
    return [(q, thresholds, how, budget if budget is not None else
             exits.simulate_exits(conf, pred, labels, thresholds, step_macs)["macs"])
            for q, thresholds, how, budget in budget_thresholds(model, BUDGET_RATIOS,
                                                                calibration_logits)]


def time_rounds(variants: dict, repeats: int) -> dict:
    """Median seconds of each variant; rounds interleave the variants."""
    seconds = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if round_index > 0:  # round 0 warms up
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


class OnnxEngine:
    """The model exported to a temporary folder and run by glancefocus_runtime."""

    def __init__(self, model, image_size: int, static_backbone, static_shape):
        from glancefocus.export import export_onnx
        from glancefocus_runtime import ExportedModel

        self.folder = tempfile.TemporaryDirectory(prefix="gf-onnx-")
        self.manifest = export_onnx(model, self.folder.name, image_size=image_size)
        self.model = ExportedModel(self.folder.name, threads=torch.get_num_threads())
        self.static = self._export_static(static_backbone, static_shape)

    def predictor(self, thresholds=None):
        from glancefocus_runtime import ExportedPredictor

        return ExportedPredictor(self.model, thresholds=thresholds)

    def _export_static(self, backbone, shape):
        """The static baseline as one ONNX graph (dynamic batch), and a session for it."""
        import warnings

        import onnxruntime as ort

        path = f"{self.folder.name}/static.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(backbone.eval(), (torch.zeros(2, *shape),), path, dynamo=False,
                              opset_version=18, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def engine_variants(engine: str, model, onnx, chunks, static_chunks, thresholds_by_name,
                    static_backbone):
    """{variant: callable} timing one engine, and {variant: predictor} of its budgets."""
    if engine == "torch":
        predictors = {name: Predictor(model, thresholds=t) for name, t in thresholds_by_name.items()}

        def run_all_steps():
            with torch.inference_mode():
                for chunk in chunks:
                    model(chunk)

        def run_static():
            with torch.inference_mode():
                for chunk in static_chunks:
                    static_backbone(chunk)

        def run(predictor):
            return [predictor.run(chunk) for chunk in chunks]
    else:
        arrays = [chunk.numpy() for chunk in chunks]
        predictors = {name: onnx.predictor([float(v) for v in t])
                      for name, t in thresholds_by_name.items()}
        everything = onnx.predictor()

        def run_all_steps():
            for array in arrays:
                everything.run(array)

        def run_static():
            for array in arrays:
                onnx.static.run(None, {"images": array})

        def run(predictor):
            return [predictor.run(array) for array in arrays]
    variants = {"all_steps": run_all_steps}
    for name, predictor in predictors.items():
        variants[name] = (lambda p=predictor: run(p))
    variants["static"] = run_static
    return variants, predictors, run


def as_tensor(values):
    return values if isinstance(values, torch.Tensor) else torch.from_numpy(values)


def benchmark(model, images, labels, calibration, source, batch_size: int, repeats: int,
              channels_last: bool, engines=("torch",), batch1_images: int = 64):
    step_macs = [int(m) for m in model.macs()["per_step"]]
    static_backbone = model.glance_encoder.backbone
    height, width = images.shape[-2:]
    static_macs = count_static_macs(static_backbone, height, width, model.config.in_chans)
    onnx = None
    if "onnx" in engines or batch1_images:
        onnx = onnx_engine_or_none(model, height, static_backbone, images.shape[1:],
                                   required="onnx" in engines)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    chunks = batches(images, batch_size)
    static_chunks = [c.contiguous(memory_format=torch.channels_last) if channels_last else c
                     for c in chunks]
    logits = all_step_logits(model, chunks)
    calibration_logits = all_step_logits(model, batches(calibration, batch_size))
    conf, pred = exits.confidences_from_logits(logits)
    chosen = choose_thresholds(model, logits, labels, step_macs, calibration_logits)
    thresholds_by_name = {f"q={q}": thresholds for q, thresholds, _, _ in chosen}

    variants, predictors, runners = {}, {}, {}
    for engine in engines:
        engine_vars, predictors[engine], runners[engine] = engine_variants(
            engine, model, onnx, chunks, static_chunks, thresholds_by_name, static_backbone)
        variants.update({(engine, name): run for name, run in engine_vars.items()})
    outcomes = {engine: {} for engine in engines}
    for q, thresholds, how, budget in chosen:
        name = f"q={q}"
        sim = exits.simulate_exits(conf, pred, labels, thresholds, step_macs)
        answers_by_engine = {}
        for engine in engines:
            result = runners[engine](predictors[engine][name])
            steps = torch.cat([as_tensor(r.exit_steps) for r in result])
            answers = torch.cat([as_tensor(r.labels) for r in result])
            answers_by_engine[engine] = (answers, steps)
            outcome = {
                "engine": engine,
                "budget": budget,
                "budget_q": q,
                "thresholds": [round(float(t), 8) for t in thresholds],
                "thresholds_from": how,
                "accuracy": float((answers == labels).double().mean() * 100),
                "macs_per_image": float(torch.tensor(step_macs, dtype=torch.float64)[steps - 1].mean()),
                "exit_share": (torch.bincount(steps - 1, minlength=len(step_macs)).double()
                               / steps.numel()).tolist(),
                "matches_simulation": bool(torch.equal(steps - 1, sim["exit_step"])
                                           and torch.equal(answers, sim["pred"])),
            }
            outcomes[engine][name] = outcome
        if len(engines) == 2 or engines == ("onnx",):
            want = answers_by_engine.get("torch") or _torch_answers(model, chunks, thresholds)
            got = answers_by_engine["onnx"]
            outcomes["onnx"][name].update(compare_engines(want, got, conf, thresholds))
    seconds = time_rounds(variants, repeats)

    reports = {engine: engine_report(engine, model, images, labels, source, batch_size, step_macs,
                                     static_macs, pred, outcomes[engine], seconds, height, width)
               for engine in engines}
    if len(engines) == 1:
        report = reports[engines[0]]
    else:
        report = dict(reports)
        report["onnx_over_torch_images_per_second"] = {
            name: seconds[("torch", name)] / seconds[("onnx", name)]
            for name in ["all_steps", *thresholds_by_name, "static"]}
    if onnx is not None and batch1_images:
        report["batch_1"] = batch_one(model, onnx, images[:batch1_images],
                                      thresholds_by_name["q=0.5"], repeats)
    return report


def onnx_engine_or_none(model, image_size, static_backbone, static_shape, required: bool):
    try:
        return OnnxEngine(model, image_size, static_backbone, static_shape)
    except ImportError as exc:  # onnx or onnxruntime missing (MissingDependencyError too)
        if required:
            raise SystemExit(f"--engine onnx: {exc}") from None
        return None
    except ValueError as exc:
        if required:
            raise SystemExit(f"--engine onnx: {exc}") from None
        return None


def compare_engines(want, got, conf, thresholds) -> dict:
    """Whether onnx's labels and exit steps equal torch's; where they differ, how close torch's
    confidence was to a threshold (the engines' float32 results differ in the last bits, so an
    image that sits on a threshold can exit one step apart)."""
    differ = (want[0] != got[0]) | (want[1] != got[1])
    report = {"matches_torch": not bool(differ.any()), "differing_images": int(differ.sum())}
    if differ.any():
        gaps = (conf[:-1, differ].double() - torch.as_tensor(thresholds[:-1])[:, None]).abs()
        report["largest_confidence_gap_to_a_threshold_of_differing_images"] = float(
            gaps.min(dim=0).values.max())
    return report


def _torch_answers(model, chunks, thresholds):
    predictor = Predictor(model, thresholds=thresholds)
    result = [predictor.run(chunk) for chunk in chunks]
    return (torch.cat([r.labels for r in result]), torch.cat([r.exit_steps for r in result]))


def engine_report(engine, model, images, labels, source, batch_size, step_macs, static_macs,
                  pred, outcomes, seconds, height, width) -> dict:
    n = images.shape[0]
    base_time, base_macs = seconds[(engine, "all_steps")], float(step_macs[-1])
    static_time = seconds[(engine, "static")]
    report = {
        "engine": engine,
        "source": source,
        "images": n, "image_size": [height, width], "batch_size": batch_size,
        "patch_size": model.config.patch_size, "max_steps": model.config.max_steps,
        "macs_per_step": step_macs,
        "all_steps": {"engine": engine,
                      "accuracy": float((pred[-1] == labels).double().mean() * 100),
                      "macs_per_image": base_macs, "images_per_second": n / base_time,
                      "seconds": base_time},
        "budgets": [],
        "static": {"engine": engine, "macs_per_image": static_macs,
                   "images_per_second": n / static_time, "seconds": static_time,
                   "macs_speedup": base_macs / static_macs, "time_speedup": base_time / static_time,
                   "note": "timed for speed only: its accuracy needs its own training"},
    }
    for name, outcome in outcomes.items():
        macs_speedup = base_macs / outcome["macs_per_image"]
        time_speedup = base_time / seconds[(engine, name)]
        report["budgets"].append(dict(
            outcome, images_per_second=n / seconds[(engine, name)],
            seconds=seconds[(engine, name)], macs_speedup=macs_speedup,
            time_speedup=time_speedup, ratio=time_speedup / macs_speedup))
    goal = [b["ratio"] >= 0.9 for b in report["budgets"] if b["macs_speedup"] >= 1.5]
    report["goal_time_over_macs_speedup_at_least_0.9"] = all(goal) if goal else None
    return report


def batch_one(model, onnx, images, thresholds, repeats: int) -> dict:
    """Images/s one image at a time (the serving case), both engines, interleaved rounds."""
    singles = [images[i:i + 1] for i in range(images.shape[0])]
    arrays = [single.numpy() for single in singles]
    torch_exit = Predictor(model, thresholds=thresholds)
    torch_all = Predictor(model)
    onnx_exit = onnx.predictor([float(v) for v in thresholds])
    onnx_all = onnx.predictor()
    variants = {
        ("torch", "all_steps"): lambda: [torch_all.run(x) for x in singles],
        ("torch", "q=0.5"): lambda: [torch_exit.run(x) for x in singles],
        ("onnx", "all_steps"): lambda: [onnx_all.run(x) for x in arrays],
        ("onnx", "q=0.5"): lambda: [onnx_exit.run(x) for x in arrays],
    }
    seconds = time_rounds(variants, repeats)
    n = len(singles)
    report = {"images": n, "note": "batch 1: one image per call (Predictor.run / "
              "ExportedPredictor.run, preprocessing excluded)"}
    for engine in ("torch", "onnx"):
        report[engine] = {name: n / seconds[(engine, name)] for name in ("all_steps", "q=0.5")}
    report["onnx_over_torch"] = {name: report["onnx"][name] / report["torch"][name]
                                 for name in ("all_steps", "q=0.5")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "resnet50", "all"), default="all")
    parser.add_argument("--checkpoint", default=None, help="a demo checkpoint (default: "
                        "demo-out/model.pt if present, else an untrained demo preset)")
    parser.add_argument("--demo-images", type=int, default=1024)
    parser.add_argument("--resnet-images", type=int, default=128)
    parser.add_argument("--demo-batch-size", type=int, default=256)
    parser.add_argument("--resnet-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last weights for every variant (faster convolutions on many CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--engine", choices=("torch", "onnx", "both"), default="torch",
                        help="PyTorch eager, the exported model on onnxruntime, or both side by side")
    parser.add_argument("--batch1-images", type=int, default=64,
                        help="images timed one at a time for the batch_1 section (0: skip it)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = ("torch", "onnx") if args.engine == "both" else (args.engine,)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "engine": args.engine,
              "channels_last": args.channels_last, "repeats": args.repeats,
              "load_average_before": list(os.getloadavg()), "models": {}}
    if args.model in ("demo", "all"):
        model, images, labels, calibration, source = demo_setup(args.checkpoint, args.demo_images,
                                                                args.seed)
        report["models"]["demo"] = benchmark(model, images, labels, calibration, source,
                                             args.demo_batch_size, args.repeats,
                                             args.channels_last, engines, args.batch1_images)
    if args.model in ("resnet50", "all"):
        model, images, labels, calibration, source = resnet50_setup(args.resnet_images, args.seed)
        report["models"]["resnet50"] = benchmark(model, images, labels, calibration, source,
                                                 args.resnet_batch_size, args.repeats,
                                                 args.channels_last, engines, args.batch1_images)
    report["load_average_after"] = list(os.getloadavg())
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
