"""`glancefocus demo`: a GFNet on cluttered MNIST, trained and measured on the machine's CPU cores.

It trains a small GFNet (the "demo" preset, a small CNN as its encoders; --preset demo_vit: a
small ViT) in one run (the one-stage recipe, train/one_stage.py; with --recipe three-stage in the
paper's three stages), trains the static baseline (the same encoder network on the whole canvas,
with stage 1's settings, for train.static_epochs at train.static_batch_size), evaluates both on
the 5,000 fixed test canvases and writes to DIR: metrics.json, accuracy_vs_macs.png,
patches.png, model.pt (the trained GFNet with calibrated exits, written as soon as it is ready and
again at the end with the baseline's numbers) and static.pt (the static baseline,
train/static.py's format). It then says whether the four claims below hold. Each phase logs its
wall and CPU seconds.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from .atomic import write_atomic, write_json
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RECIPES, load_config, to_dict
from .data import build_datasets
from .evaluate import evaluate_model, exit_curve_from
from .macs import count_static_macs
from .presets import get_preset
from .train import train
from .train.evaluation import evaluate_anytime
from .train.loaders import usable_cpus
from .train.runtime import start_runtime
from .train.stages import with_class_count
from .train.state import final_checkpoint
from .train.static import (
    evaluate_static,
    save_static_baseline,
    static_batch_size,
    static_epochs,
    train_static_baseline,
)

log = logging.getLogger("glancefocus.demo")

PATCH_EXAMPLES = 12
DEMO_PRESETS = ("demo", "demo_vit")
"""The presets `glancefocus demo` trains: the CNN demo and the same demo with a small ViT."""
NETWORK_NAMES = {"demo_cnn": "CNN", "demo_vit": "ViT"}
"""What the summary and the figure call the static baseline's network."""
EXPECTED_TIME = "10 minutes in float32 with AVX-512, 7 with native bf16"
"""The CNN demo's time on 2 cores, estimated from the parts' measured times (docs/results.md),
for the log line; the ViT demo's has not been measured."""


def register(subparsers) -> None:
    from .cli import HelpFormatter

    p = subparsers.add_parser(
        "demo", help="train and measure a GFNet on cluttered MNIST (the CNN demo on 2 CPU cores: "
             "about 10 minutes in float32 with AVX-512)",
        description="Train a small GFNet on cluttered MNIST (in one run, or in the paper's three "
                    "stages with --recipe three-stage), and the same encoder network (a small "
                    "CNN, or a small ViT with --preset demo_vit) as a static baseline; "
                    "measure both on 5,000 test canvases and write DIR/metrics.json, "
                    "DIR/accuracy_vs_macs.png, DIR/patches.png (numbered boxes: 1 = the glance, "
                    "2.. = the focus patches), DIR/model.pt (with calibrated exits, ready for "
                    "`glancefocus predict --budget`) and DIR/static.pt (the static baseline).",
        formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder")
    p.add_argument("--preset", choices=list(DEMO_PRESETS), default="demo",
                   help="demo: a small CNN as the glance and focus encoders (on 2 cores about "
                        f"{EXPECTED_TIME}); demo_vit: a small ViT (4 x 4 pixel patches, AdamW "
                        "with warm-up; its time has not been measured)")
    p.add_argument("--recipe", choices=list(RECIPES), default="one-stage",
                   help="train the GFNet in one run (encoders, classifier and policy together), "
                        "or in the paper's three stages (for the CNN demo about 8 minutes more "
                        "on 2 cores of an AVX2-only CPU)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: every core this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the preset, e.g. train.stage1.epochs=4 (default: none)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .train.command import log_to_console

    log_to_console()
    with logging_redirect_tqdm(loggers=[logging.getLogger("glancefocus")]):
        metrics = run_demo(args.out, [f"train.recipe={args.recipe}", *args.overrides],
                           progress=not args.no_progress, threads=args.threads,
                           preset=args.preset)
    print(summary(metrics))
    return 0


def run_demo(out_dir, overrides=(), progress: bool = True, threads: Optional[int] = None,
             preset: str = "demo") -> dict:
    """Train, evaluate, plot and save; returns what metrics.json holds.

    threads: torch's CPU threads (None: every core this process may use); preset: one of
    DEMO_PRESETS."""
    if preset not in DEMO_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(DEMO_PRESETS)}, got {preset!r}")
    began = time.time()
    threads = use_threads(threads)
    out = Path(out_dir)
    base = get_preset(preset)
    base["train"]["out_dir"] = str(out / "run")
    config = load_config(None, list(overrides), base=base)
    # only the CNN demo's time has been measured
    expected = f"on 2 cores about {EXPECTED_TIME}" if preset == "demo" else "time not measured"
    log.info("demo: preset %s (%s encoders): a GFNet (%s recipe), then the static baseline, on "
             "cluttered MNIST, with %d CPU thread%s (%s); output in %s", preset,
             config.model.arch, config.train.recipe, threads, "" if threads == 1 else "s",
             expected, out)
    phases = PhaseClock()
    with phases("data"):
        datasets = build_datasets(config.data, config.model.in_chans)
    train_set, test_set, classes = datasets
    config = with_class_count(config, classes)  # the preset leaves the class count to the data

    with phases("gfnet_training"):
        train(config, datasets=datasets, progress=progress, overwrite=True)  # a rerun starts afresh
    model = load_checkpoint(final_checkpoint(config.train.out_dir, config.train.recipe))
    runtime = start_runtime(config.train.device, config.train.amp)
    batch = config.train.batch_size
    with phases("gfnet_evaluation"):
        model.to(runtime.device)
        metrics = measure_gfnet(model, test_set, runtime, batch, config.train.seed)
        # calibrate the exit thresholds (the authors' 39 budgets): model.pt answers `predict --budget`
        model.cpu()
        evaluation = evaluate_model(model, config.data, calibrate_images=config.data.train_canvases,
                                    batch_size=batch, log=log.info)
        model.exit_curve = exit_curve_from(evaluation)
        budgeted = evaluation["budgeted"]
        metrics["budgeted"] = {"budgets": budgeted["budgets"], "macs": budgeted["macs"],
                               "accuracy": budgeted["accuracy"]}
    # the GFNet is ready before the (longer) static baseline starts: saved now, and again with
    # the baseline's numbers at the end
    _save_gfnet(model, metrics, out / "model.pt", config)
    log.info("demo: the trained GFNet with calibrated exits is in %s", out / "model.pt")

    with phases("static_training"):
        backbone, _ = train_static_baseline(config, train_set, runtime, progress)
    with phases("static_evaluation"):
        static_accuracy = evaluate_static(backbone, test_set, runtime, batch,
                                          config.train.channels_last)
    save_static_baseline(out / "static.pt", backbone, config.model, config.data, classes)
    static_macs = count_static_macs(backbone, config.data.image_size, config.data.image_size,
                                    config.model.in_chans)
    metrics["static_baseline"] = {"accuracy": static_accuracy, "macs": static_macs,
                                  "epochs": static_epochs(config),
                                  "batch_size": static_batch_size(config),
                                  "image_size": config.data.image_size,
                                  "network": NETWORK_NAMES.get(config.model.arch,
                                                               config.model.arch)}
    metrics["claims"] = check_claims(metrics)
    with phases("figures"):
        plot_accuracy_vs_macs(metrics, out / "accuracy_vs_macs.png")
        plot_patches(model, test_set, out / "patches.png")
    _save_gfnet(model, metrics, out / "model.pt", config)
    metrics.update(preset=preset, config=to_dict(config), threads=threads,
                   stage_seconds=phases.wall, stage_cpu_seconds=phases.cpu,
                   seconds=time.time() - began)
    log.info("demo: %s", phases.describe())
    write_json(out / "metrics.json", metrics)
    return metrics


def use_threads(threads: Optional[int] = None) -> int:
    """Set torch's CPU threads to `threads` (None: every core this process may use)."""
    if threads is None:
        threads = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    busy = _load_average()
    if threads > 1 and busy is not None and busy > usable_cpus():
        # measured on a shared 2-core machine: a stage-1 step took 10.8 s with 2 threads and
        # 3.3 s with 1, as each parallel region waits for a thread that another job holds
        log.warning("demo: the machine is busy (load average %.1f on %d cores): %d threads may "
                    "wait on each other; if steps are slow, try --threads 1", busy, usable_cpus(),
                    threads)
    return threads


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


class PhaseClock:
    """Wall and process CPU seconds per named phase (CPU time sums every thread's, so on a
    machine shared with other work it shows what wall time cannot)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.time(), time.process_time()
        yield  # a phase that raises is not recorded
        self.wall[name] = self.wall.get(name, 0.0) + time.time() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
        log.info("demo: %s took %.0f s (CPU %.0f s)", name, self.wall[name], self.cpu[name])

    def describe(self) -> str:
        return "time per phase (wall / CPU seconds): " + ", ".join(
            f"{name} {self.wall[name]:.0f} / {self.cpu[name]:.0f}" for name in self.wall)


def _save_gfnet(model, metrics: dict, path: Path, config) -> None:
    model.metrics = {key: metrics[key] for key in ("gfnet", "random_policy", "static_baseline")
                     if key in metrics}
    save_checkpoint(model, path, run_config=to_dict(config))


def measure_gfnet(model, test_set, runtime, batch_size: int, seed: int) -> dict:
    """Anytime accuracy, MACs and hit rate per step on `test_set`, with the learned policy
    ('gfnet') and with uniform random locations ('random_policy', seeded)."""
    learned = evaluate_anytime(model, test_set, runtime, batch_size)
    random = evaluate_anytime(model, test_set, runtime, batch_size, locations="random", seed=seed)
    per_step_macs = model.macs()["per_step"]
    return {"gfnet": _curve(learned, per_step_macs), "random_policy": _curve(random, per_step_macs)}


def _curve(evaluation: dict, macs: list[int]) -> dict:
    return {"anytime_accuracy": evaluation["accuracy"], "anytime_macs": macs,
            "hit_rate": evaluation["hit_rate"]}


# ----------------------------------------------------------------------------------------------
# the claims

def check_claims(metrics: dict) -> dict:
    """The four things the demo must show, each with the numbers behind it."""
    gfnet, random, static = metrics["gfnet"], metrics["random_policy"], metrics["static_baseline"]
    accuracy, macs = gfnet["anytime_accuracy"], gfnet["anytime_macs"]
    first_hit, random_hit = gfnet["hit_rate"][0], random["hit_rate"][0]
    step2, random_step2 = accuracy[1], random["anytime_accuracy"][1]
    # the first step that reaches the static baseline's accuracy (within 0.5 points)
    reaching = [k for k, a in enumerate(accuracy) if a >= static["accuracy"] - 0.5]
    match_macs = macs[reaching[0]] if reaching else None
    largest_fall = max([accuracy[k] - accuracy[k + 1] for k in range(len(accuracy) - 1)], default=0.0)
    return {
        "first_focus_hit_rate": {
            "holds": first_hit >= 0.8 and first_hit >= 2 * random_hit,
            "text": f"first-focus hit rate {first_hit:.3f} >= 0.8 and >= 2 x random's {random_hit:.3f}"},
        "policy_beats_random": {
            "holds": step2 >= random_step2 + 2,
            "text": f"step-2 accuracy {step2:.2f}% >= random locations' {random_step2:.2f}% + 2"},
        "static_accuracy_at_third_macs": {
            "holds": match_macs is not None and match_macs <= static["macs"] / 3,
            "text": (f"reaches the static baseline's {static['accuracy']:.2f}% (within 0.5) at "
                     + (f"{match_macs / 1e6:.1f}M" if match_macs else "no step")
                     + f" MACs <= a third of its {static['macs'] / 1e6:.1f}M")},
        "accuracy_never_falls": {
            "holds": largest_fall <= 0.3,
            "text": f"largest fall from one step to the next {max(largest_fall, 0.0):.2f} "
                    "<= 0.3 points"},
    }


def summary(metrics: dict) -> str:
    gfnet, random, static = metrics["gfnet"], metrics["random_policy"], metrics["static_baseline"]
    lines = ["step  MACs (M)  GFNet acc  random acc  GFNet hit  random hit"]
    for k, macs in enumerate(gfnet["anytime_macs"]):
        hit = (f"{gfnet['hit_rate'][k - 1]:>9.3f}  {random['hit_rate'][k - 1]:>10.3f}" if k
               else f"{'-':>9}  {'-':>10}")
        lines.append(f"{k + 1:>4}  {macs / 1e6:>8.1f}  {gfnet['anytime_accuracy'][k]:>9.2f}  "
                     f"{random['anytime_accuracy'][k]:>10.2f}  {hit}")
    lines.append(f"static {static['network']} on the whole canvas: {static['accuracy']:.2f}% at "
                 f"{static['macs'] / 1e6:.1f}M MACs")
    lines.append("claims:")
    for claim in metrics["claims"].values():
        lines.append(f"  [{'holds' if claim['holds'] else 'FAILS'}] {claim['text']}")
    lines.append(f"total time {metrics['seconds']:.0f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# figures (matplotlib's Agg canvas, through Figure: no global pyplot state)

def plot_accuracy_vs_macs(metrics: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for name, label, style in (("gfnet", "GFNet, learned policy", "o-"),
                               ("random_policy", "GFNet, random locations", "s--")):
        curve = metrics[name]
        ax.plot([m / 1e6 for m in curve["anytime_macs"]], curve["anytime_accuracy"], style, label=label)
    if "budgeted" in metrics:
        curve = metrics["budgeted"]
        ax.plot([m / 1e6 for m in curve["macs"]], curve["accuracy"], "-", alpha=0.7,
                label="GFNet, early exit at 39 budgets")
    static = metrics["static_baseline"]
    side = static.get("image_size", 100)  # metrics.json files written before it was recorded
    ax.plot([static["macs"] / 1e6], [static["accuracy"]], "r*", markersize=14,
            label=f"static {static['network']}, whole {side}x{side} canvas")
    ax.set_xlabel("multiply-adds per image (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Cluttered MNIST: anytime accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


@torch.no_grad()
def plot_patches(model, dataset, path: Path, count: int = PATCH_EXAMPLES) -> None:
    """Test canvases with the true digit box (green, dashed) and boxes numbered by step, as
    `predict --visualize` numbers them: 1 the glance (the whole canvas), 2.. the focus patches
    the policy chose."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    items = [dataset[i] for i in range(count)]
    images = torch.stack([item[0] for item in items]).to(next(model.parameters()).device)
    model.eval()
    out = model(images)
    predictions = out.logits.argmax(-1).cpu()
    columns = 4
    fig = Figure(figsize=(3 * columns, 3.2 * ((count + columns - 1) // columns)))
    axes = fig.subplots((count + columns - 1) // columns, columns, squeeze=False).flatten()
    colours = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= count:
            continue
        image, label, target = items[i]
        ax.imshow(image[0].cpu().numpy(), cmap="gray")
        x0, y0, x1, y1 = target.tolist()
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ls="--",
                               ec="lime", lw=1.5))
        for step, box in enumerate(out.boxes[:, i].tolist(), start=1):
            colour = colours[(step - 1) % len(colours)]
            bx0, by0, bx1, by1 = box
            ax.add_patch(Rectangle((bx0 - 0.5, by0 - 0.5), bx1 - bx0, by1 - by0,
                                   fill=False, ec=colour, lw=1.5))
            ax.text(bx0 + 1, by0 + 1, str(step), color=colour, fontsize=9, va="top",
                    fontweight="bold")
        steps = "/".join(str(int(p)) for p in predictions[:, i])
        ax.set_title(f"true {label}, predicted {steps}", fontsize=9)
    fig.suptitle("1 = the glance (whole canvas), 2.. = the focus patches; green dashed = the digit")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
