"""`glancefocus evaluate`: anytime accuracy, budgeted batch classification, and the calibrated
exit curve that `predict --budget` needs (the authors' protocol, exactly).

1. Every step is run for every validation image (eval mode, the policy's mean): Top-1 and Top-5
   after each step.
2. Thresholds for the 39 budgets are calibrated on training images seen with the training
   augmentation (a fixed-seed subset of train.calibrate_images images), or taken from the
   checkpoint (`--calibrate stored`, e.g. an imported authors' file), then applied to the
   validation set: accuracy and expected MACs per budget.
3. The curve and the anytime metrics go into a checkpoint: by default a copy, OUT/model.pt,
   so the file given is left as it was; with `--in-place` the given native checkpoint is
   rewritten atomically with everything else in it kept. The model can then be used at a MACs
   budget (`glancefocus predict --budget`, `model.predict(images, budget=...)`).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from . import exits
from .atomic import atomic_path, write_json
from .checkpoint import (
    FORMAT,
    checkpoint_dict,
    model_from_checkpoint_dict,
    read_checkpoint,
)
from .cli import HelpFormatter
from .config import DataConfig, TrainConfig, from_dict, to_dict
from .data import ImageFolderDataset, collate_skip_bad, holdout_dataset
from .data.cluttered_mnist import ClutteredMNIST
from .predictor import resolve_device
from .train.loaders import resolve_num_workers
from .transforms import create_transform, preset_data_section


class BudgetDeviationWarning(UserWarning):
    """The MACs realised on the evaluation images are far from the budget asked for."""


CALIBRATION_SEED = 0
"""Which training images calibrate the thresholds, and their augmentation: fixed, so that
evaluating the same checkpoint twice gives the same curve."""


# ----------------------------------------------------------------------------------------------
# what the checkpoint says about its data

def data_config_for(run_config: dict, root: Optional[str] = None) -> DataConfig:
    """The checkpoint's data config (or, without one, its preset's), root overridden by `root`.

    An image-folder dataset needs a root: a checkpoint without a data section (an imported
    authors' file) must be given one.
    """
    section = run_config.get("data")
    stored = section is not None
    if not stored:
        section = preset_data_section(run_config["model"]["arch"])
    section = dict(section)
    if root is not None:
        section["root"] = str(root)
    config = from_dict(DataConfig, section, prefix="data.")
    if config.dataset == "folder" and not config.root:
        where = ("its data section names no root" if stored else
                 "it stores no data section (e.g. an imported authors' file)")
        raise ValueError(f"the checkpoint's images are an image folder and {where}: give --data ROOT "
                         "(ROOT/train/<class>/..., ROOT/val/<class>/...)")
    return config


def validation_dataset(config: DataConfig, channels: int):
    if config.dataset == "cluttered-mnist":
        return ClutteredMNIST(config, "test", channels=channels)
    dataset = ImageFolderDataset(config.root, "val", config, train=False, channels=channels)
    # the very preprocessing `predict` and `glancefocus.create_transform` apply to a file
    dataset.transform = create_transform(config, channels)
    return dataset


def training_dataset(config: DataConfig, channels: int, classes: list):
    """Training images with the training augmentation (fresh canvases for cluttered MNIST)."""
    if config.dataset == "cluttered-mnist":
        return ClutteredMNIST(config, "train", channels=channels)
    return ImageFolderDataset(config.root, "train", config, train=True, channels=channels,
                              classes=classes, part="train")  # those trained on


def check_classes(model, dataset) -> None:
    classes = list(dataset.classes)
    if len(classes) != model.config.num_classes:
        raise ValueError(f"the data has {len(classes)} classes but the model {model.config.num_classes}")
    if model.class_names and list(model.class_names) != classes:
        raise ValueError("the data's class folders differ from the model's class names "
                         f"(e.g. data {classes[:3]} vs model {list(model.class_names)[:3]})")


# ----------------------------------------------------------------------------------------------
# running every step for every image

@dataclass
class StepOutputs:
    """What the exit simulation needs from a set whose every step was run."""

    confidences: torch.Tensor   # [T, N] max softmax probability (float32)
    predictions: torch.Tensor   # [T, N]
    labels: torch.Tensor        # [N]
    top1_correct: list          # [T] counts
    top5_correct: list          # [T] counts

    @property
    def count(self) -> int:
        return int(self.labels.numel())

    def anytime(self) -> dict:
        n = max(self.count, 1)
        return {"top1": [c * 100.0 / n for c in self.top1_correct],
                "top5": [c * 100.0 / n for c in self.top5_correct]}


def collect_step_outputs(model, dataset, batch_size: int, num_workers: int = 0,
                         device="cpu") -> StepOutputs:
    """Run every step for every image of `dataset` (eval mode, the policy's mean)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=resolve_num_workers(num_workers, device), collate_fn=collate_skip_bad)
    steps = model.config.max_steps
    conf, pred, labels = [], [], []
    top1, top5 = [0] * steps, [0] * steps
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                if batch is None:  # every file of this batch was unreadable
                    continue
                images, targets = batch[0].to(device), batch[1]
                logits = model(images).logits.float().cpu()
                batch_conf, batch_pred = exits.confidences_from_logits(logits)
                conf.append(batch_conf)
                pred.append(batch_pred)
                labels.append(targets)
                # anytime_accuracy gives percentages of this batch: back to counts to sum them
                acc = exits.anytime_accuracy(logits, targets)
                n = targets.numel()
                top1 = [c + round(p * n / 100) for c, p in zip(top1, acc["top1"])]
                top5 = [c + round(p * n / 100) for c, p in zip(top5, acc["top5"])]
    finally:
        model.train(was_training)
    if hasattr(dataset, "check_bad_fraction"):
        dataset.check_bad_fraction()
    elif hasattr(getattr(dataset, "dataset", None), "check_bad_fraction"):
        dataset.dataset.check_bad_fraction()
    if not labels:
        raise ValueError("no readable images to evaluate")
    return StepOutputs(torch.cat(conf, dim=1), torch.cat(pred, dim=1), torch.cat(labels),
                       top1, top5)


def calibration_subset(dataset, count: int, seed: int = CALIBRATION_SEED):
    """`count` images of `dataset` chosen by `seed` (all of them when it holds fewer)."""
    if count <= 0:
        raise ValueError(f"the number of calibration images must be > 0, got {count}")
    if count >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, sorted(chosen.tolist()))


@contextlib.contextmanager
def seeded(seed: int):
    """Seed the global RNG (the training augmentation draws from it) and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------
# the budgeted curve

def evaluate_thresholds(thresholds, outputs: StepOutputs, step_macs) -> dict:
    """Accuracy, expected MACs and exit shares of each row of `thresholds` [B, T] on `outputs`."""
    curve = {"thresholds": [], "macs": [], "accuracy": [], "exit_share": []}
    for row in torch.as_tensor(thresholds, dtype=torch.float64):
        sim = exits.simulate_exits(outputs.confidences, outputs.predictions, outputs.labels, row,
                                   step_macs)
        curve["thresholds"].append(row.tolist())
        curve["macs"].append(sim["macs"])
        curve["accuracy"].append(sim["accuracy"])
        curve["exit_share"].append(sim["exit_share"].tolist())
    return curve


def stored_thresholds(model) -> tuple[list, list]:
    """(budgets, thresholds 39 x T) from the checkpoint's exit curve."""
    curve = model.exit_curve
    if not curve or not curve.get("thresholds"):
        raise ValueError("--calibrate stored: the checkpoint holds no exit thresholds; calibrate "
                         "them on training images with --calibrate train")
    thresholds = curve["thresholds"]
    if any(len(row) != model.config.max_steps for row in thresholds):
        raise ValueError(f"--calibrate stored: the stored thresholds are not {model.config.max_steps} "
                         "per budget (one per step)")
    budgets = curve.get("budgets") or exits.budget_ratios()[:len(thresholds)]
    return list(budgets), thresholds


# ----------------------------------------------------------------------------------------------
# the whole evaluation

def calibration_dataset(data: DataConfig, channels: int, classes: list, calibrate_on: str,
                        val_set):
    """(dataset, what it is, augmented) for --calibrate-on: 'train' (training images with the
    training augmentation, the authors' choice), 'val' (the evaluation images themselves),
    'heldout' (the training images held out of training, data.holdout_fraction) or an image
    folder DIR/<class>/... with the evaluation transforms."""
    if calibrate_on == "train":
        return training_dataset(data, channels, classes), "training images", True
    if calibrate_on == "val":
        return val_set, "the evaluation images themselves", False
    if calibrate_on == "heldout":
        return holdout_dataset(data, channels, classes), "held-out training images", False
    folder = Path(calibrate_on)
    if not folder.is_dir():
        raise ValueError(f"--calibrate-on takes train, val, heldout or a folder DIR/<class>/..., "
                         f"and '{calibrate_on}' is none of them")
    dataset = ImageFolderDataset(folder.parent, folder.name, data, train=False, channels=channels,
                                 classes=classes)
    dataset.transform = create_transform(data, channels)
    return dataset, f"the images of {folder}", False


BUDGET_WARNING = 0.10
"""Warn when the MACs realised on the evaluation images miss the requested ones by more than
this share at a budget of q 0.25 to 1."""


def requested_macs(budgets, steps: int, step_macs) -> list[float]:
    """The MACs per image each budget q asks for: the target exit shares (q ** k, normalised)
    times the cumulative MACs of the steps."""
    return [float((exits.target_shares(q, steps).double()
                   * torch.as_tensor(step_macs, dtype=torch.float64)).sum()) for q in budgets]


def budget_deviation_warning(curve: dict, calibration: dict) -> Optional[str]:
    """A warning when the realised MACs are far from the requested ones (None otherwise)."""
    worst = max(((abs(d), q, d) for q, d in zip(curve["budgets"], curve["macs_deviation"])
                 if 0.25 <= q <= 1.0), default=None)
    if worst is None or worst[0] <= BUDGET_WARNING:
        return None
    _, q, deviation = worst
    hint = (" The model is more (or less) confident on the training images it has fit than "
            "on new ones, so thresholds calibrated on them let too few (or too many) new images "
            "exit early: calibrate on images it has not trained on (--calibrate-on heldout after "
            "training with data.holdout_fraction, or --calibrate-on DIR)"
            if calibration.get("on") == "train" else "")
    return (f"the MACs realised on the evaluation images are {deviation:+.1%} off the requested "
            f"budget at q {q:g} (more than {BUDGET_WARNING:.0%}; calibrated on "
            f"{calibration.get('what', calibration['mode'])}).{hint}")


def evaluate_model(model, data: DataConfig, calibrate: str = "train",
                   calibrate_images: int = 200000, batch_size: int = 64, device="cpu",
                   log=print, calibrate_on: str = "train") -> dict:
    """Anytime accuracy and the budgeted curve of `model` on `data` (see the module docstring).
    calibrate_on: which images calibrate the thresholds (see calibration_dataset)."""
    if calibrate not in ("train", "stored"):
        raise ValueError(f"calibrate must be 'train' or 'stored', got {calibrate!r}")
    channels = model.config.in_chans
    step_macs = model.macs()["per_step"]
    if calibrate == "stored":
        budgets, thresholds = stored_thresholds(model)  # fail before the long run
    val_set = validation_dataset(data, channels)
    check_classes(model, val_set)
    log(f"running all {model.config.max_steps} steps on {len(val_set)} validation images")
    val = collect_step_outputs(model, val_set, batch_size, data.num_workers, device)
    calibration = {"mode": calibrate}
    if calibrate == "train":
        if calibrate_on == "val":
            calib, what, augmented = val, "the evaluation images themselves", False
        else:
            dataset, what, augmented = calibration_dataset(data, channels, list(val_set.classes),
                                                           calibrate_on, val_set)
            subset = calibration_subset(dataset, calibrate_images)
            log(f"calibrating thresholds on {len(subset)} {what}"
                + (" (training augmentation)" if augmented else ""))
            with seeded(CALIBRATION_SEED):
                calib = collect_step_outputs(model, subset, batch_size, data.num_workers, device)
        thresholds = exits.calibrate_budgets(calib.confidences)
        budgets = exits.budget_ratios()
        calibration.update(on=calibrate_on, what=what, images=calib.count, seed=CALIBRATION_SEED,
                           augmentation=augmented)
    else:
        calibration["source"] = (model.exit_curve or {}).get("source", "checkpoint")
    curve = dict(budgets=budgets, **evaluate_thresholds(thresholds, val, step_macs))
    curve["requested_macs"] = requested_macs(budgets, model.config.max_steps, step_macs)
    curve["macs_deviation"] = [realised / asked - 1
                               for realised, asked in zip(curve["macs"], curve["requested_macs"])]
    warning = budget_deviation_warning(curve, calibration)
    if warning:
        warnings.warn(warning, BudgetDeviationWarning, stacklevel=2)
    return {
        "model": {"arch": model.config.arch, "patch_size": model.config.patch_size,
                  "max_steps": model.config.max_steps, "num_classes": model.config.num_classes},
        "data": {"dataset": data.dataset, "root": data.root, "val_images": val.count,
                 "classes": list(val_set.classes)},
        "calibration": calibration,
        "macs_per_step": list(step_macs),
        "anytime": val.anytime(),
        "budgeted": curve,
    }


def exit_curve_from(results: dict) -> dict:
    """The curve to store in a checkpoint (what thresholds_for_budget and predict read)."""
    budgeted = results["budgeted"]
    return {
        "budgets": list(budgeted["budgets"]),
        "thresholds": budgeted["thresholds"],
        "macs": budgeted["macs"],
        "accuracy": budgeted["accuracy"],
        "calibration": dict(results["calibration"]),
        "evaluated_on": _data_summary(results),
    }


def metrics_from(results: dict) -> dict:
    return {"anytime_top1": results["anytime"]["top1"], "anytime_top5": results["anytime"]["top5"],
            "evaluated_on": _data_summary(results)}


def _data_summary(results: dict) -> dict:
    return {k: v for k, v in results["data"].items() if k != "classes"}


def with_exit_curve(raw: dict, results: dict, keep_training: bool = True) -> dict:
    """The native checkpoint dict `raw` (from read_checkpoint) with the exit curve and metrics
    added, everything else (run config, weights, training state unless dropped) as it was."""
    raw = dict(raw)
    raw["exit_curve"] = exit_curve_from(results)
    raw["metrics"] = {**dict(raw.get("metrics") or {}), **metrics_from(results)}
    if not raw.get("class_names"):  # e.g. a converted authors' file: name the classes now
        raw["class_names"] = list(results["data"]["classes"])
    if not keep_training:
        raw["training"] = None
    return raw


def store_in_checkpoint(path, raw: dict, results: dict, keep_training: bool = True) -> None:
    """Write `raw` with the exit curve and metrics to `path`, atomically."""
    with atomic_path(path) as tmp:
        torch.save(with_exit_curve(raw, results, keep_training), tmp)


def store_in_native_copy(path, model, results: dict) -> None:
    """Write `model` (e.g. imported from an authors' file) as a native checkpoint with the curve."""
    model.exit_curve = exit_curve_from(results)
    model.metrics = {**model.metrics, **metrics_from(results)}
    model.class_names = model.class_names or list(results["data"]["classes"])
    with atomic_path(path) as tmp:
        torch.save(checkpoint_dict(model), tmp)


def at_budget(results: dict, macs_budget: float) -> dict:
    """Accuracy and expected MACs on the validation set at a MACs budget: the calibrated budget
    `predict --budget` would use (exits.budget_index: an error below the curve, a warning above)."""
    budgeted = results["budgeted"]
    index = exits.budget_index(budgeted, macs_budget)
    return {"budget_macs": macs_budget, "q": budgeted["budgets"][index],
            "macs": budgeted["macs"][index], "accuracy": budgeted["accuracy"][index],
            "thresholds": budgeted["thresholds"][index]}


# ----------------------------------------------------------------------------------------------
# the plot

def plot_accuracy_vs_macs(results: dict, path, baseline: Optional[dict] = None) -> None:
    """Anytime points, the budgeted curve and the static baseline, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (1e9, "G") if max(results["macs_per_step"]) >= 1e9 else (1e6, "M")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    budgeted = results["budgeted"]
    order = sorted(range(len(budgeted["macs"])), key=lambda i: budgeted["macs"][i])
    ax.plot([budgeted["macs"][i] / scale for i in order], [budgeted["accuracy"][i] for i in order],
            "-", color="tab:blue", label="budgeted (early exit)")
    anytime_macs = [m / scale for m in results["macs_per_step"]]
    ax.plot(anytime_macs, results["anytime"]["top1"], "o", color="tab:orange", label="anytime (step k)")
    for k, (x, y) in enumerate(zip(anytime_macs, results["anytime"]["top1"]), start=1):
        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if baseline:
        ax.plot([baseline["macs"] / scale], [baseline["accuracy"]], "*", markersize=12,
                color="tab:red", label="static baseline")
    ax.set_xlabel(f"MACs per image ({unit})")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(f"{results['model']['arch']}, P={results['model']['patch_size']}, "
                 f"T={results['model']['max_steps']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the command

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="accuracy per step and at 39 compute budgets; calibrates the early exits",
        description="Accuracy after each step (step 1 = the glance) and at 39 compute budgets, "
                    "with exit thresholds calibrated on training images. Writes OUT/evaluation.json, "
                    "OUT/accuracy_vs_macs.png and OUT/model.pt, a copy of the checkpoint with the "
                    "calibrated exits (the checkpoint given is left as it was unless --in-place).",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a glancefocus checkpoint (or an authors' file "
                   "with --trust-pickle)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for evaluation.json, accuracy_vs_macs.png and model.pt")
    p.add_argument("--budget", type=float, default=None, metavar="MACS",
                   help="also print the accuracy at this many multiply-adds per image, e.g. 10e6, "
                        "with the calibrated thresholds predict --budget would use (default: none)")
    p.add_argument("--in-place", action="store_true",
                   help="store the calibrated exits in the checkpoint given, rewriting it, instead "
                        "of in the copy DIR/model.pt (native checkpoints only)")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="image folder root (ROOT/train, ROOT/val); overrides the checkpoint's "
                        "data.root (default: the checkpoint's)")
    p.add_argument("--calibrate", choices=("train", "stored"), default="train",
                   help="train: calibrate thresholds on augmented training images; "
                        "stored: evaluate the thresholds already in the checkpoint")
    p.add_argument("--calibrate-on", default="train", metavar="train|val|heldout|DIR",
                   help="which images calibrate the thresholds: train (training images with the "
                        "training augmentation, as the authors: reproduces their numbers), val "
                        "(the evaluation images themselves), heldout (the training images held "
                        "out by data.holdout_fraction at training time) or a folder "
                        "DIR/<class>/... of other images; on images the model has not fit, the "
                        "realised MACs follow the requested budget more closely")
    p.add_argument("--calibrate-images", type=int, default=None, metavar="N",
                   help="training images for calibration (default: the config's "
                        "train.calibrate_images, or all when fewer)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--static-baseline-macs", type=float, default=None, metavar="M",
                   help="MACs of a static network to mark on the plot, with "
                        "--static-baseline-accuracy (default: none)")
    p.add_argument("--static-baseline-accuracy", type=float, default=None, metavar="A",
                   help="its top-1 accuracy in percent (default: none)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling an authors' *.pth.tar (only for files you trust)")
    p.set_defaults(func=_cmd_evaluate)


def check_arguments(args) -> None:
    """Mistakes found before the long run."""
    if (args.static_baseline_macs is None) != (args.static_baseline_accuracy is None):
        raise ValueError("give both --static-baseline-macs and --static-baseline-accuracy, or neither")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be > 0 MACs per image, got {args.budget:g}")
    copy = Path(args.out) / "model.pt"
    if not args.in_place and copy.exists() and _same_file(copy, args.checkpoint):
        raise ValueError(f"--out {args.out} would overwrite the checkpoint '{args.checkpoint}' with "
                         "its copy: give another --out, or --in-place to rewrite it")


def _same_file(a: Path, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _cmd_evaluate(args) -> int:
    check_arguments(args)
    raw = read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    native = raw.get("format") == FORMAT
    if args.in_place and not native:
        raise ValueError(f"--in-place: '{args.checkpoint}' is not a native glancefocus checkpoint "
                         "(an authors' pickle is never rewritten); leave --in-place out to write "
                         "the copy DIR/model.pt")
    model = model_from_checkpoint_dict(raw, args.checkpoint)
    run_config = dict(raw["config"]) if native else {"model": to_dict(model.config)}
    data = data_config_for(run_config, args.data)
    calibrate_images = args.calibrate_images
    if calibrate_images is None:
        calibrate_images = (run_config.get("train") or {}).get("calibrate_images",
                                                               TrainConfig().calibrate_images)
    device = resolve_device(args.device)
    model.to(device)
    results = evaluate_model(model, data, args.calibrate, calibrate_images, args.batch_size, device,
                             calibrate_on=args.calibrate_on)
    out = Path(args.out)
    baseline = None
    if args.static_baseline_macs is not None:
        baseline = {"macs": args.static_baseline_macs, "accuracy": args.static_baseline_accuracy}
    results.update(static_baseline=baseline, checkpoint=str(args.checkpoint), device=str(device))
    budget_error = None
    if args.budget is not None:
        try:  # the calibration is not lost to a budget off the curve: report it at the end
            results["at_budget"] = at_budget(results, args.budget)
        except exits.BudgetOutOfRangeError as exc:
            budget_error = exc
    results["stored_in"] = str(store_exit_curve(args, raw, native, model, results, out))
    write_json(out / "evaluation.json", results)
    plot_accuracy_vs_macs(results, out / "accuracy_vs_macs.png", baseline)
    _print_summary(results, out)
    if budget_error is not None:
        raise budget_error
    return 0


def store_exit_curve(args, raw: dict, native: bool, model, results: dict, out: Path) -> Path:
    """Where the calibrated curve goes: the checkpoint itself with --in-place, else OUT/model.pt
    (a native copy: the weights, run config, class names, metrics and the curve; no training
    state). An authors' pickle is never rewritten."""
    if args.in_place:
        store_in_checkpoint(args.checkpoint, raw, results)
        return Path(args.checkpoint)
    copy = out / "model.pt"
    if native:
        store_in_checkpoint(copy, raw, results, keep_training=False)
    else:
        store_in_native_copy(copy, model.cpu(), results)
    return copy


def _summary_rows(budgeted: dict) -> list:
    """A few budgets across the curve, cheapest first."""
    order = sorted(range(len(budgeted["macs"])), key=lambda i: budgeted["macs"][i])
    picks = sorted({order[round(f * (len(order) - 1))] for f in (0, 0.1, 0.25, 0.5, 0.75, 1)},
                   key=lambda i: budgeted["macs"][i])
    return picks


def _print_summary(results: dict, out: Path) -> None:
    anytime = results["anytime"]
    print("step  MACs / image      top-1    top-5    (step 1 = the glance)")
    for k, macs in enumerate(results["macs_per_step"]):
        print(f"{k + 1:>4}  {macs:>16,}  {anytime['top1'][k]:6.2f}  {anytime['top5'][k]:6.2f}")
    budgeted = results["budgeted"]
    print("budget q  MACs / image      top-1    requested MACs    off by  (over the validation "
          "set)")
    for i in _summary_rows(budgeted):
        requested = budgeted.get("requested_macs")
        extra = (f"  {requested[i]:>16,.0f}  {budgeted['macs_deviation'][i]:+7.1%}" if requested
                 else "")
        print(f"{budgeted['budgets'][i]:>8.2f}  {budgeted['macs'][i]:>16,.0f}  "
              f"{budgeted['accuracy'][i]:6.2f}{extra}")
    if "at_budget" in results:
        pick = results["at_budget"]
        print(f"at a budget of {pick['budget_macs']:,.0f} MACs per image: top-1 "
              f"{pick['accuracy']:.2f} % at {pick['macs']:,.0f} MACs per image (budget q "
              f"{pick['q']:.2f}, the thresholds predict --budget uses)")
    print(f"wrote {out / 'evaluation.json'}, {out / 'accuracy_vs_macs.png'}; the calibrated exit "
          f"curve is stored in {results['stored_in']}")
