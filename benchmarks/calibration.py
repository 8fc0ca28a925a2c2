"""Do budgets hold on new images? The MACs realised on the evaluation images against the budget
asked for, with exit thresholds calibrated on different images.

    python benchmarks/calibration.py --checkpoint RUN/stage3/last.pt [--on train,heldout,val]
        [--calibrate-images N] [--json FILE]

For each calibration source (`glancefocus evaluate --calibrate-on`: train = training images with
the training augmentation, as the authors; heldout = the share of the training images held out
at training time by data.holdout_fraction; val = the evaluation images themselves; or a folder)
and each q of 0.25, 0.5 and 1.0: the requested MACs per image (the target exit shares, q ** k
normalised, times the steps' cumulative MACs), the realised ones on the evaluation images and
their relative difference, with the accuracy. Prints (and with --json writes) one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from glancefocus.checkpoint import load_checkpoint, read_checkpoint
from glancefocus.evaluate import data_config_for, evaluate_model

QS = (0.25, 0.5, 1.0)


def measure(checkpoint, sources, calibrate_images: int, batch_size: int = 256) -> dict:
    model = load_checkpoint(checkpoint)
    data = data_config_for(dict(read_checkpoint(checkpoint)["config"]))
    result = {"checkpoint": str(checkpoint), "dataset": data.dataset,
              "holdout_fraction": data.holdout_fraction, "sources": {}}
    for source in sources:
        evaluation = evaluate_model(model, data, calibrate_images=calibrate_images,
                                    batch_size=batch_size, log=lambda *a: None,
                                    calibrate_on=source)
        budgeted = evaluation["budgeted"]
        rows = []
        for q in QS:
            i = budgeted["budgets"].index(q)
            rows.append({"q": q, "requested_macs": budgeted["requested_macs"][i],
                         "realised_macs": budgeted["macs"][i],
                         "deviation": budgeted["macs_deviation"][i],
                         "accuracy": budgeted["accuracy"][i]})
        result["sources"][source] = {"calibration_images": evaluation["calibration"]["images"],
                                     "val_images": evaluation["data"]["val_images"],
                                     "rows": rows}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--on", default="train,heldout,val")
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
