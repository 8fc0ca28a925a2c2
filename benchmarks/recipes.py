"""The three-stage and the one-stage recipe, trained side by side in one run on the demo's
setting (cluttered MNIST), with the same evaluation and the wall-clock seconds of each training.

    python benchmarks/recipes.py [key=value ...] [--recipes three-stage,one-stage]
                                 [--seeds 0,1,...] [--threads 2] [--out DIR] [--json FILE]

key=value overrides change the demo preset for both recipes, e.g. RAM's other setting:
data.canvas_size=60 data.image_size=60 data.num_clutter=4 model.patch_size=24. The recipes
train one after the other in this process (the same data, threads and machine), each timed from
its start to its last checkpoint; nothing else should run meanwhile. Prints one JSON object:
{"three_stage": {...}, "one_stage": {...}, "goals": {...}}, each recipe with seconds (and their
split: seconds_training_passes, the passes over the training data with their SGD steps, the
one-stage recipe's policy updates and loading; seconds_end_of_epoch, the BatchNorm
re-estimation, evaluation and checkpoint after each epoch; seconds_other, the rest: stage 2's
PPO updates, building the models), anytime_accuracy [T] (percent, the policy's mean locations
on the 5,000 test canvases), hit_rate [T-1] (share of focus patches holding the digit's centre),
random_policy_accuracy [T] and random_hit_rate [T-1] (uniform random locations),
anytime_macs [T].

One run's accuracy on 5,000 test canvases has a standard error of ~0.4 points at 92 %; --seeds
trains each recipe once per seed (train.seed; the recipes alternate, so the machine's drift
touches both) and reports the means over the seeds, each seed's numbers under "runs", the
standard deviation of each step's accuracy, and the goals of the means and of every seed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from glancefocus.atomic import write_json  # noqa: E402
from glancefocus.checkpoint import load_checkpoint  # noqa: E402
from glancefocus.config import RECIPES, load_config  # noqa: E402
from glancefocus.data import build_datasets  # noqa: E402
from glancefocus.demo import measure_gfnet  # noqa: E402
from glancefocus.presets import get_preset  # noqa: E402
from glancefocus.train import train  # noqa: E402
from glancefocus.train.runtime import start_runtime  # noqa: E402
from glancefocus.train.state import final_checkpoint  # noqa: E402

ACCURACY_TOLERANCE = 0.3   # points below the three-stage recipe, at every step
MIN_HIT_RATE = 0.95        # first focus step
MAX_TIME_RATIO = 0.6       # one-stage seconds / three-stage seconds


def run_recipe(recipe: str, overrides: list[str], out_dir: Path, datasets, progress: bool) -> dict:
    base = get_preset("demo")
    config = load_config(None, [*overrides, f"train.recipe={recipe}",
                                f"train.out_dir={out_dir}"], base=base)
    began = time.time()
    history = train(config, datasets=datasets, progress=progress, overwrite=True)
    seconds = time.time() - began
    epochs = [m for stage, rows in history.items() if stage != 2 for m in rows]
    passes = sum(m["train_seconds"] for m in epochs)
    ends = sum(m["seconds"] for m in epochs) - passes
    model = load_checkpoint(final_checkpoint(config.train.out_dir, recipe))
    runtime = start_runtime(config.train.device, config.train.amp)
    model.to(runtime.device)
    measured = measure_gfnet(model, datasets[1], runtime, config.train.batch_size,
                             config.train.seed)
    learned, random = measured["gfnet"], measured["random_policy"]
    return {"seconds": seconds,
            "seconds_training_passes": passes,
            "seconds_end_of_epoch": ends,
            "seconds_other": seconds - passes - ends,
            "anytime_accuracy": learned["anytime_accuracy"],
            "hit_rate": learned["hit_rate"],
            "random_policy_accuracy": random["anytime_accuracy"],
            "random_hit_rate": random["hit_rate"],
            "anytime_macs": learned["anytime_macs"]}


def check_goals(three: dict, one: dict) -> dict:
    """The issue's goals for the one-stage recipe against the three-stage one."""
    shortfall = max(a - b for a, b in zip(three["anytime_accuracy"], one["anytime_accuracy"]))
    ratio = one["seconds"] / three["seconds"]
    first_hit = one["hit_rate"][0] if one["hit_rate"] else None
    return {
        "largest_shortfall_points": shortfall,
        "accuracy_holds": shortfall <= ACCURACY_TOLERANCE,
        "first_focus_hit_rate": first_hit,
        "hit_rate_holds": first_hit is not None and first_hit >= MIN_HIT_RATE,
        "time_ratio": ratio,
        "time_holds": ratio <= MAX_TIME_RATIO,
    }


def mean_over_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """One recipe's runs (one per seed): the mean of every number, each step's accuracy's
    standard deviation across the seeds, and the runs themselves."""
    summary = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, list):
            summary[key] = [sum(v) / len(v) for v in zip(*values)]
        else:
            summary[key] = sum(values) / len(values)
    per_step = zip(*(run["anytime_accuracy"] for run in runs))
    summary["anytime_accuracy_std"] = [statistics.stdev(v) if len(v) > 1 else 0.0
                                       for v in per_step]
    summary["seeds"] = seeds
    summary["runs"] = runs
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma-separated recipes to train, in this order")
    parser.add_argument("--seeds", metavar="S,S,...",
                        help="comma-separated train.seed values: each recipe is trained once per "
                             "seed and the JSON reports the means (default: one run, the "
                             "config's seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", metavar="DIR", help="run folders (default: a temporary folder)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; recipes: {', '.join(RECIPES)}")
    seeds = _parse_seeds(parser, args.seeds)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="gf-recipes-"))
    config = load_config(None, args.overrides, base=get_preset("demo"))
    datasets = build_datasets(config.data, config.model.in_chans)
    result: dict = {"overrides": args.overrides, "threads": args.threads,
                    "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    runs: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
    for seed in seeds or [None]:
        for recipe in recipes:
            overrides = args.overrides if seed is None else [*args.overrides, f"train.seed={seed}"]
            folder = out_dir / recipe if seed is None else out_dir / f"seed{seed}" / recipe
            runs[recipe].append(run_recipe(recipe, overrides, folder, datasets, args.progress))
    for recipe in recipes:
        key = recipe.replace("-", "_")
        result[key] = mean_over_seeds(runs[recipe], seeds) if seeds else runs[recipe][0]
    if "three_stage" in result and "one_stage" in result:
        result["goals"] = check_goals(result["three_stage"], result["one_stage"])
        if seeds:
            result["goals"]["per_seed"] = [
                {"seed": seed, **check_goals(three, one)}
                for seed, three, one in zip(seeds, runs["three-stage"], runs["one-stage"])]
    text = json.dumps(result)
    print(text)
    if args.json:
        write_json(args.json, result)
    return result


def _parse_seeds(parser, text):
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        parser.error(f"--seeds expects comma-separated integers, got '{text}'")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds lists a seed twice: '{text}'")
    return seeds


if __name__ == "__main__":
    main()
