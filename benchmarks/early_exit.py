"""Does early exit really save time? Images per second and MACs per image, on the same images, for

  (a) every step for every image (how the authors evaluate: model.forward, exits simulated later),
  (b) real early exit (predictor.Predictor) at several budgets,
  (c) the static baseline: the same backbone on the whole image.

    python benchmarks/early_exit.py [--model demo|resnet50|all] [--checkpoint CKPT] [--json FILE]
                                    [--repeats 3] [--threads N] [--channels-last]

demo: the checkpoint given, else demo-out/model.pt (from `glancefocus demo`) if present, else an
untrained demo preset; cluttered-MNIST test canvases at the model's data config; batch 256.
resnet50: random weights at 224 px, random images; batch 64. Thresholds: the checkpoint's
calibrated curve when it has one (budgets picked by MACs), else calibrated on the benchmark
images' own all-steps outputs (so the exit shares are the budgets' targets). Timing: CPU,
torch.inference_mode, one warm-up round, then `repeats` rounds that run every variant in turn
(so a change of machine load hits all of them alike); the median round counts.
Prints (and with --json writes) one JSON object; per budget: budget, accuracy, macs_per_image,
images_per_second, macs_speedup and time_speedup (both relative to (a)), and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from glancefocus import create_model, exits, load_checkpoint
from glancefocus.config import DataConfig, from_dict
from glancefocus.data.cluttered_mnist import ClutteredMNIST
from glancefocus.evaluate import data_config_for
from glancefocus.macs import count_static_macs
from glancefocus.predictor import Predictor

BUDGET_RATIOS = (0.1, 0.25, 0.5, 1.0)
"""q of the budgets benchmarked (REFERENCE §3: the share exiting at step k is proportional to
q ** k): 0.1 sends most images out at the glance, 1.0 spreads them evenly over the steps."""


# ----------------------------------------------------------------------------------------------
# models and images

def demo_setup(checkpoint, images: int, seed: int):
    """(model, images, labels, where the model came from)."""
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
    section.update(test_canvases=images)
    canvases = ClutteredMNIST(from_dict(DataConfig, section), "test", channels=model.config.in_chans)
    pixels = torch.stack([canvases[i][0] for i in range(len(canvases))])
    return model, pixels, canvases.labels.clone(), source


def resnet50_setup(images: int, seed: int):
    torch.manual_seed(seed)
    model = create_model("resnet50").eval()
    g = torch.Generator().manual_seed(seed)
    # smooth random structure plus noise, so that images differ in more than noise
    coarse = torch.nn.functional.interpolate(torch.rand(images, 3, 7, 7, generator=g), size=224,
                                             mode="bilinear", align_corners=False)
    pixels = (coarse * 4 - 2) + 0.3 * torch.randn(images, 3, 224, 224, generator=g)
    labels = torch.randint(1000, (images,), generator=g)
    return model, pixels, labels, "random weights, random images: accuracy is chance level"


# ----------------------------------------------------------------------------------------------
# measuring

def batches(images: torch.Tensor, batch_size: int):
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def all_step_logits(model, chunks) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk).logits for chunk in chunks], dim=1)


def choose_thresholds(model, logits, labels, step_macs):
    """[(q, thresholds, how they were chosen, the MACs per image they aim at)] for BUDGET_RATIOS."""
    curve = model.exit_curve if model.exit_curve and model.exit_curve.get("macs") else None
    chosen = []
    for q in BUDGET_RATIOS:
        index = round(q * 20) - 1
        if curve is not None:
            budget = curve["macs"][index]
            thresholds = Predictor(model, budget=budget).thresholds
            how = "the checkpoint's calibrated curve (glancefocus evaluate)"
        else:
            conf, pred = exits.confidences_from_logits(logits)
            thresholds = exits.calibrate_budgets(conf)[index]
            budget = exits.simulate_exits(conf, pred, labels, thresholds, step_macs)["macs"]
            how = "calibrated on these images' own all-steps outputs"
        chosen.append((q, thresholds, how, budget))
    return chosen


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


def benchmark(model, images, labels, source, batch_size: int, repeats: int, channels_last: bool):
    step_macs = model.macs()["per_step"]
    static_backbone = model.glance_encoder.backbone
    height, width = images.shape[-2:]
    static_macs = count_static_macs(static_backbone, height, width, model.config.in_chans)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    chunks = batches(images, batch_size)
    static_chunks = [c.contiguous(memory_format=torch.channels_last) if channels_last else c
                     for c in chunks]
    logits = all_step_logits(model, chunks)
    conf, pred = exits.confidences_from_logits(logits)

    predictors, outcomes = {}, {}
    for q, thresholds, how, budget in choose_thresholds(model, logits, labels, step_macs):
        predictor = Predictor(model, thresholds=thresholds)
        result = [predictor.run(chunk) for chunk in chunks]
        steps = torch.cat([r.exit_steps for r in result])
        answers = torch.cat([r.labels for r in result])
        sim = exits.simulate_exits(conf, pred, labels, thresholds, step_macs)
        predictors[f"q={q}"] = predictor
        outcomes[f"q={q}"] = {
            "budget": budget,
            "budget_q": q,
            "thresholds": [round(float(t), 8) for t in thresholds],
            "thresholds_from": how,
            "accuracy": float((answers == labels).double().mean() * 100),
            "macs_per_image": float(torch.cat([r.macs for r in result]).double().mean()),
            "exit_share": (torch.bincount(steps - 1, minlength=len(step_macs)).double()
                           / steps.numel()).tolist(),
            "matches_simulation": bool(torch.equal(steps - 1, sim["exit_step"])
                                       and torch.equal(answers, sim["pred"])),
        }

    def run_all_steps():
        with torch.inference_mode():
            for chunk in chunks:
                model(chunk)

    def run_static():
        with torch.inference_mode():
            for chunk in static_chunks:
                static_backbone(chunk)

    variants = {"all_steps": run_all_steps}
    for name, predictor in predictors.items():
        variants[name] = (lambda p=predictor: [p.run(chunk) for chunk in chunks])
    variants["static"] = run_static
    seconds = time_rounds(variants, repeats)

    n = images.shape[0]
    base_time, base_macs = seconds["all_steps"], float(step_macs[-1])
    report = {
        "source": source,
        "images": n, "image_size": [height, width], "batch_size": batch_size,
        "patch_size": model.config.patch_size, "max_steps": model.config.max_steps,
        "macs_per_step": step_macs,
        "all_steps": {"accuracy": float((pred[-1] == labels).double().mean() * 100),
                      "macs_per_image": base_macs, "images_per_second": n / base_time,
                      "seconds": base_time},
        "budgets": [],
        "static": {"macs_per_image": static_macs, "images_per_second": n / seconds["static"],
                   "seconds": seconds["static"], "macs_speedup": base_macs / static_macs,
                   "time_speedup": base_time / seconds["static"],
                   "note": "timed for speed only: its accuracy needs its own training"},
    }
    for name, outcome in outcomes.items():
        macs_speedup = base_macs / outcome["macs_per_image"]
        time_speedup = base_time / seconds[name]
        report["budgets"].append(dict(
            outcome, images_per_second=n / seconds[name],
            seconds=seconds[name], macs_speedup=macs_speedup, time_speedup=time_speedup,
            ratio=time_speedup / macs_speedup))
    goal = [b["ratio"] >= 0.8 for b in report["budgets"] if b["macs_speedup"] >= 1.5]
    report["goal_time_over_macs_speedup_at_least_0.8"] = all(goal) if goal else None
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "channels_last": args.channels_last, "repeats": args.repeats,
              "load_average_before": list(os.getloadavg()), "models": {}}
    if args.model in ("demo", "all"):
        model, images, labels, source = demo_setup(args.checkpoint, args.demo_images, args.seed)
        report["models"]["demo"] = benchmark(model, images, labels, source, args.demo_batch_size,
                                             args.repeats, args.channels_last)
    if args.model in ("resnet50", "all"):
        model, images, labels, source = resnet50_setup(args.resnet_images, args.seed)
        report["models"]["resnet50"] = benchmark(model, images, labels, source, args.resnet_batch_size,
                                                 args.repeats, args.channels_last)
    report["load_average_after"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
