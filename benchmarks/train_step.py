"""How long does one training step take? Median seconds of one stage-1 step and one stage-2 update.

    python benchmarks/train_step.py --preset resnet50 --batch 16 [--amp bf16|fp16|none]
        [--channels-last] [--steps 5] [--warmup 1] [--device cpu|cuda] [--threads N]
        [--json FILE] [key=value ...]

Stage 1 (the authors' setting): uniform random locations, the preset's T and P, the preset's
image size (224 px for the ImageNet presets) and class count (1000), their loss (CE of every step
plus dsn_ratio x CE of the encoders' own heads, over T), Nesterov SGD with their per-part learning
rates; one step = forward, backward, optimiser step. Stage 2: one PPO update = a rollout with
sampled locations under no_grad (encoders and classifier frozen, in eval mode) plus the PPO
gradient step(s) of the policy with Adam. Both use the project's own training pieces
(GlanceFocusLoss, gfnet_sgd, freeze_for_stage, set_train_modes, collect_rollout, ppo_update), so
this times what `glancefocus train` runs, minus data loading: inputs are random tensors.
Weights are random (model.pretrained=false). Warm-up steps are not timed.

Extra `key=value` arguments override the preset as on the command line of `glancefocus train`
(e.g. model.arch=resnet18 model.num_classes=10 data.image_size=128).
Prints (and with --json writes) one JSON object: stage1_seconds, stage2_seconds (medians), every
timed step, and the settings (preset, batch, amp, channels_last, device, threads, torch version).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from glancefocus.config import load_config
from glancefocus.model import GlanceFocusNet
from glancefocus.presets import default_num_classes, get_preset
from glancefocus.train.faults import NonFiniteGuard
from glancefocus.train.optim import freeze_for_stage, gfnet_sgd, set_train_modes
from glancefocus.train.ppo import PPOLoss, collect_rollout, policy_optimizer, ppo_update
from glancefocus.train.runtime import start_runtime
from glancefocus.train.supervised import GlanceFocusLoss


def build_setup(preset: str, batch: int, amp: str = "none", channels_last: bool = False,
                device: str = "cpu", overrides: tuple[str, ...] = (), seed: int = 0):
    """(config, runtime, model, images, labels) for `batch` random images at the preset's size."""
    config = load_config(base=get_preset(preset),
                         overrides=["model.pretrained=false", f"train.amp={amp}",
                                    f"train.channels_last={str(channels_last).lower()}",
                                    f"train.device={device}", *overrides])
    if config.model.num_classes is None:  # training reads it from the data
        config.model.num_classes = default_num_classes(preset)
    runtime = start_runtime(config.train.device, config.train.amp)
    torch.manual_seed(seed)
    model = GlanceFocusNet(config.model).to(runtime.device)
    size = config.data.image_size
    images = torch.randn(batch, config.model.in_chans, size, size, device=runtime.device)
    labels = torch.randint(config.model.num_classes, (batch,), device=runtime.device)
    if channels_last:
        # as `glancefocus train` does: the model and every batch in channels-last layout
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return config, runtime, model, images, labels


def stage1_step(config, runtime, model, images, labels) -> Callable[[], None]:
    """One stage-1 step as train_epoch runs it (one micro-batch): forward, backward, SGD step."""
    stage_config = config.train.stage1
    freeze_for_stage(model, 1, stage_config)
    set_train_modes(model, 1, stage_config)
    optimizer = gfnet_sgd(model, 1, stage_config)
    loss_module = GlanceFocusLoss(model, stage_config.dsn_ratio, random_locations=True)
    scaler = runtime.grad_scaler()
    generator = runtime.generator(config.train.seed, 1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss, _ = loss_module(images, labels, generator)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError("the benchmark's stage-1 loss is not finite")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step


def stage2_step(config, runtime, model, images, labels) -> Callable[[], None]:
    """One PPO update as run_policy_stage runs it: rollout under no_grad, then ppo_update."""
    stage_config = config.train.stage2
    freeze_for_stage(model, 2, stage_config)
    set_train_modes(model, 2, stage_config)
    optimizer = policy_optimizer(model.policy, stage_config.ppo_lr)
    ppo_loss = PPOLoss(model.policy, stage_config.ppo_clip, stage_config.value_coef,
                       stage_config.entropy_coef)
    guard = NonFiniteGuard(config.train.max_nonfinite)
    generator = runtime.generator(config.train.seed, 2)
    updates = 0
    # the benchmark times the batch it is given in one pass, as its stage-1 step does ('auto'
    # fits a run to a device; a number given with train.micro_batch=N is kept)
    micro_batch = config.train.micro_batch if isinstance(config.train.micro_batch, int) else 0

    def step() -> None:
        nonlocal updates
        rollout = collect_rollout(model, images, labels, runtime, generator, micro_batch)
        ppo_update(ppo_loss, optimizer, rollout, stage_config, runtime, guard, where="benchmark",
                   movement=updates % max(stage_config.kl_every, 1) == 0)
        updates += 1

    return step


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones (the device synchronised)."""
    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    synchronise()
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        synchronise()
        seconds.append(time.perf_counter() - began)
    return seconds


def run_benchmark(preset: str, batch: int, amp: str = "none", channels_last: bool = False,
                  steps: int = 5, warmup: int = 1, device: str = "cpu", threads: int = 0,
                  overrides: tuple[str, ...] = (), stages: tuple[int, ...] = (1, 2)) -> dict:
    """Median seconds per step of the stages asked for, with the settings, as a JSON-ready dict."""
    if threads > 0:
        torch.set_num_threads(threads)
    config, runtime, model, images, labels = build_setup(preset, batch, amp, channels_last, device,
                                                         overrides)
    result = {"preset": preset, "arch": config.model.arch, "batch": batch, "amp": amp,
              "channels_last": channels_last, "device": str(runtime.device),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "image_size": config.data.image_size, "patch_size": config.model.patch_size,
              "max_steps": config.model.max_steps, "num_classes": config.model.num_classes,
              "warmup": warmup, "overrides": list(overrides)}
    builders = {1: stage1_step, 2: stage2_step}
    for stage in stages:
        step = builders[stage](config, runtime, model, images, labels)
        seconds = time_steps(step, runtime.device, steps, warmup)
        result[f"stage{stage}_seconds"] = statistics.median(seconds)
        result[f"stage{stage}_all_seconds"] = [round(s, 4) for s in seconds]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per stage (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--stage", type=int, choices=(1, 2), action="append",
                        help="only this stage (repeatable; default both)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    result = run_benchmark(args.preset, args.batch, args.amp, args.channels_last, args.steps,
                           args.warmup, args.device, args.threads, tuple(args.overrides),
                           tuple(args.stage or (1, 2)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
