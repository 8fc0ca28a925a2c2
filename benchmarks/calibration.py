"""Do budgets hold on new images? The MACs realised on the evaluation images against the budget
asked for, with exit thresholds calibrated on different images.

    python benchmarks/calibration.py --checkpoint RUN/stage3/last.pt [--on train,heldout,val]
        [--calibrate-images N] [--json FILE]

For each calibration source (`glancefocus evaluate --calibrate-on`: train = training images with
the training augmentation, as the authors; heldout = the share of the training images held out
at training time by data.holdout_fraction; val = the evaluation images themselves; or a folder)
('fresh-test', cluttered MNIST: canvases of the test digits drawn with another seed, for a model
trained without data.holdout_fraction) and each q of 0.25, 0.5 and 1.0: the requested MACs per image (the target exit shares, q ** k
normalised, times the steps' cumulative MACs), the realised ones on the evaluation images and
their relative difference, with the accuracy. Prints (and with --json writes) one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from glancefocus import exits
from glancefocus.checkpoint import load_checkpoint, read_checkpoint
from glancefocus.data import ClutteredMNIST
from glancefocus.evaluate import (
    CALIBRATION_SEED,
    calibration_dataset,
    calibration_subset,
    collect_step_outputs,
    data_config_for,
    evaluate_thresholds,
    requested_macs,
    seeded,
    validation_dataset,
)

QS = (0.25, 0.5, 1.0)


def calibration_set(data, channels: int, classes: list, source: str, val_set):
    """The images `source` names: evaluate's sources (train, heldout, val, a folder), or
    'fresh-test' (cluttered MNIST only): canvases of the test digits drawn with another seed,
    images the model never trained on, apart from the evaluated canvases (their digits shared)."""
    if source == "fresh-test":
        if data.dataset != "cluttered-mnist":
            raise ValueError("fresh-test calibration is for cluttered MNIST only")
        return ClutteredMNIST(dataclasses.replace(data, seed=data.seed + FRESH_SEED_OFFSET),
                              "test", channels=channels), False
    dataset, _, augmented = calibration_dataset(data, channels, classes, source, val_set)
    return dataset, augmented


FRESH_SEED_OFFSET = 1000


def measure(checkpoint, sources, calibrate_images: int, batch_size: int = 256) -> dict:
    model = load_checkpoint(checkpoint).eval()
    data = data_config_for(dict(read_checkpoint(checkpoint)["config"]))
    channels, steps = model.config.in_chans, model.config.max_steps
    step_macs = model.macs()["per_step"]
    val_set = validation_dataset(data, channels)
    val = collect_step_outputs(model, val_set, batch_size)  # the evaluation images, once
    result = {"checkpoint": str(checkpoint), "dataset": data.dataset,
              "holdout_fraction": data.holdout_fraction, "val_images": val.count,
              "anytime_top1": val.anytime()["top1"], "sources": {}}
    budgets = exits.budget_ratios()
    asked = requested_macs(budgets, steps, step_macs)
    for source in sources:
        dataset, augmented = calibration_set(data, channels, list(val_set.classes), source,
                                             val_set)
        with seeded(CALIBRATION_SEED):
            calib = (val if source == "val" else collect_step_outputs(
                model, calibration_subset(dataset, calibrate_images), batch_size))
        curve = evaluate_thresholds(exits.calibrate_budgets(calib.confidences), val, step_macs)
        rows = []
        for q in QS:
            i = budgets.index(q)
            rows.append({"q": q, "requested_macs": asked[i], "realised_macs": curve["macs"][i],
                         "deviation": curve["macs"][i] / asked[i] - 1,
                         "accuracy": curve["accuracy"][i]})
        result["sources"][source] = {"calibration_images": calib.count,
                                     "augmentation": augmented, "rows": rows}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--on", default="train,heldout,val",
                        help="calibration sources: train, heldout, val, fresh-test, a folder")
    parser.add_argument("--calibrate-images", type=int, default=200000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.checkpoint, args.on.split(","), args.calibrate_images)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
