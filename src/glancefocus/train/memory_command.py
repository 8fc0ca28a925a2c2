"""`glancefocus memory`: the estimated memory of a training step, per stage, micro-batch, AMP mode
and activation checkpointing, for any preset or config (the count of memory.py, the one
train.micro_batch=auto uses); with CUDA also the measured peak of real steps."""
from __future__ import annotations

import json
from typing import Optional, Sequence

import torch

from ..config import RunConfig
from .fit import HEADROOM, parse_bytes
from .memory import GB, KINDS, MemoryCounter
from .runtime import Runtime

AMPS = ("none", "bf16", "fp16")


def memory_rows(config: RunConfig, micro_batches: Sequence[int], amps: Sequence[str] = AMPS,
                kinds: Sequence[str] = KINDS, budget: Optional[int] = None,
                measure: bool = False, device="cpu") -> list[dict]:
    """One row per kind of step, micro-batch, AMP mode and checkpointing (stage 2: per
    micro-batch only, its float32 update and gradient-free rollout do not depend on them)."""
    counter = MemoryCounter(config, device)
    batch = config.train.batch_size
    rows = []
    for kind in kinds:
        variants = ([("none", False)] if kind == "2" else
                    [(amp, ckpt) for amp in amps for ckpt in (False, True)])
        for amp, ckpt in variants:
            for micro in micro_batches:
                row = counter.estimate(kind, batch, micro, amp, ckpt)
                row["authors_setting"] = (kind == "1/3" and micro == batch and amp == "none"
                                          and not ckpt)
                if budget is not None:
                    row["fits"] = row["estimated_bytes"] <= HEADROOM * budget
                if measure:
                    row["measured_bytes"] = measure_on_cuda(config, kind, micro, amp, ckpt)
                rows.append(row)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    measured = any("measured_bytes" in r for r in rows)
    fits = any("fits" in r for r in rows)
    lines = [f"{'stage':>9} {'micro':>5} {'amp':>4} {'ckpt':>4} {'params':>6} {'grads':>6} "
             f"{'optim':>6} {'input':>6} {'activ':>6} {'rollout':>7} {'recomp':>6} "
             f"{'total GB':>8}" + (" measured" if measured else "") + (" fits" if fits else "")]
    for r in rows:
        cells = [r["parameters_bytes"], r["gradients_bytes"], r["optimizer_bytes"],
                 r["input_bytes"], r["activations_bytes"]]
        line = (f"{r['stage']:>9} {r['micro_batch']:>5} {r['amp']:>4} "
                f"{'on' if r['activation_checkpointing'] else 'off':>4} "
                + " ".join(f"{c / GB:6.2f}" for c in cells)
                + f" {r.get('rollout_bytes', 0) / GB:7.2f} {r['recompute_peak_bytes'] / GB:6.2f}"
                + f" {r['estimated_gb']:8.2f}")
        if measured:
            line += f" {r['measured_bytes'] / GB:8.2f}" if "measured_bytes" in r else f" {'':>8}"
        if fits:
            line += f" {'yes' if r['fits'] else 'no':>4}"
        lines.append(line + ("  <- the authors' setting" if r["authors_setting"] else ""))
    return lines


# ----------------------------------------------------------------------------------------------
# the real thing, on a GPU

def measure_on_cuda(config: RunConfig, kind: str, micro: int, amp: str, checkpointing: bool,
                    steps: int = 2) -> int:
    """torch.cuda.max_memory_allocated of the last of `steps` real steps of `kind` (the first
    makes the optimiser state), on random images, as the training loops run them."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    step = training_step(config, kind, micro, amp, checkpointing, device)
    for index in range(steps):
        if index == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del step
    torch.cuda.empty_cache()
    return int(peak)


def training_step(config: RunConfig, kind: str, micro: int, amp: str, checkpointing: bool, device):
    """A function running one training step of `kind` (the loops' own pieces: the losses,
    gfnet_sgd, the rollout and ppo_update) on a fresh model of `config` and random images."""
    import dataclasses

    from ..model import GlanceFocusNet
    from .faults import NonFiniteGuard
    from .memory import AMP_DTYPES
    from .one_stage import InterleavedPPO
    from .one_stage_loss import OneStageLoss
    from .optim import freeze_for_stage, gfnet_sgd, set_train_modes
    from .ppo import PPOLoss, collect_rollout, policy_optimizer, ppo_update
    from .state import ONE_STAGE
    from .supervised import GlanceFocusLoss, train_epoch

    runtime = Runtime(device, amp_dtype=AMP_DTYPES[amp])
    train = config.train
    model = GlanceFocusNet(dataclasses.replace(config.model, pretrained=False,
                                               pretrained_glance=None)).to(device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    model.set_activation_checkpointing(checkpointing)
    batch, size = train.batch_size, config.data.image_size
    images = torch.randn(batch, config.model.in_chans, size, size, device=device)
    if train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(config.model.num_classes, (batch,), device=device)
    guard = NonFiniteGuard(10 ** 9)
    generator = runtime.generator(0, 1)
    stage = {"1/3": 1, "2": 2, "one-stage": ONE_STAGE}[kind]
    settings = (train.one_stage if stage == ONE_STAGE else
                getattr(train, f"stage{stage}"))
    freeze_for_stage(model, stage, settings)
    set_train_modes(model, stage, settings)
    if stage == 2:
        optimizer = policy_optimizer(model.policy, settings.ppo_lr)
        ppo_loss = PPOLoss(model.policy, settings.ppo_clip, settings.value_coef,
                           settings.entropy_coef)

        def policy_step():
            rollout = collect_rollout(model, images, labels, runtime, generator, micro)
            ppo_update(ppo_loss, optimizer, rollout, settings, runtime, guard, where="memory")
        return policy_step
    optimizer = gfnet_sgd(model, stage, settings)
    scaler = runtime.grad_scaler()
    after_step = None
    if stage == ONE_STAGE:
        loss = OneStageLoss(model, settings.dsn_ratio, glance_weight=settings.glance_loss_weight,
                            focus_fraction=settings.focus_fraction, focus_on=settings.focus_on)
        after_step = InterleavedPPO(model, loss, settings, runtime, guard).after_step
    else:
        loss = GlanceFocusLoss(model, settings.dsn_ratio, random_locations=True)
    steps_per_call = settings.ppo_every if stage == ONE_STAGE else 1

    def supervised_step():
        # ppo_every batches, so that the one-stage update on their joined rollout is included
        train_epoch(loss, model, [(images, labels)] * steps_per_call, optimizer, runtime, guard,
                    steps=model.config.max_steps, micro_batch=micro,
                    channels_last=train.channels_last, scaler=scaler, generator=generator,
                    progress=False, after_step=after_step)
    return supervised_step


# ----------------------------------------------------------------------------------------------
# the command

def register(subparsers) -> None:
    from ..cli import HelpFormatter

    p = subparsers.add_parser(
        "memory", help="estimated memory of a training step per stage, micro-batch and precision",
        formatter_class=HelpFormatter,
        description="The memory one training step needs, counted (the saved tensors of two "
                    "small probe passes, extrapolated linearly; parameters, gradients, optimiser "
                    "state, inputs) for stages 1/3, stage 2 and the one-stage recipe (which "
                    "keeps train.one_stage.ppo_every steps of rollout states), per micro-batch, "
                    "AMP mode and activation checkpointing. The count leaves out the CUDA "
                    "context, cuDNN workspaces and fragmentation: train.micro_batch=auto keeps "
                    f"estimates within {HEADROOM:.0%} of the budget. With CUDA, also the measured "
                    "peak of real steps (torch.cuda.max_memory_allocated).")
    p.add_argument("--config", metavar="FILE", help="YAML run configuration")
    p.add_argument("--preset", metavar="NAME", help="a named configuration (default: resnet50 "
                   "when neither --config nor --preset is given)")
    p.add_argument("--micro-batches", default=None, metavar="N,N,...",
                   help="micro-batches to estimate (default: train.batch_size and its halvings "
                        "down to an eighth)")
    p.add_argument("--amp", default=",".join(AMPS), help="AMP modes to estimate")
    p.add_argument("--stages", default=",".join(KINDS),
                   help="kinds of step: 1/3 (stages 1 and 3), 2, one-stage")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help=f"mark the rows whose estimate is within {HEADROOM * 100:.0f}%% of this, e.g. "
                        "15GB (default: no marks)")
    p.add_argument("--no-measure", action="store_true",
                   help="with CUDA: estimates only, no measured steps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.batch_size=128 model.num_classes=37")
    p.set_defaults(func=_cmd_memory)


def _cmd_memory(args) -> int:
    import dataclasses

    from ..presets import assumed_num_classes
    from .command import resolve_config

    preset = args.preset or (None if args.config else "resnet50")
    config = resolve_config(args.config, preset, args.overrides)
    if config.model.num_classes is None:
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, num_classes=assumed_num_classes(config)))
    batch = config.train.batch_size
    if args.micro_batches:
        micro_batches = [int(m) for m in args.micro_batches.split(",")]
    else:
        micro_batches = [batch >> i for i in range(4) if batch % (1 << i) == 0]
    amps = args.amp.split(",")
    kinds = args.stages.split(",")
    if any(a not in AMPS for a in amps):
        raise ValueError(f"--amp takes {', '.join(AMPS)}, got {args.amp}")
    if any(k not in KINDS for k in kinds):
        raise ValueError(f"--stages takes {', '.join(KINDS)}, got {args.stages}")
    if any(m < 1 or m > batch for m in micro_batches):
        raise ValueError(f"every micro-batch must be between 1 and train.batch_size={batch}")
    budget = parse_bytes(args.budget) if args.budget else None
    measure = torch.cuda.is_available() and not args.no_measure
    rows = memory_rows(config, micro_batches, amps, kinds, budget, measure)
    if args.json:
        print(json.dumps({"rows": rows, "settings": {
            "preset": preset, "config": args.config, "overrides": list(args.overrides),
            "batch_size": batch, "budget_bytes": budget, "headroom": HEADROOM,
            "cuda_measured": measure, "torch": torch.__version__,
            "method": "saved_tensors_hooks at micro-batches 2 and 4 (fake tensors on a CPU), "
                      "linear in the micro-batch"}}))
        return 0
    print(f"{preset or args.config}: effective batch {batch}, {config.data.image_size} px, "
          f"T {config.model.max_steps}, P {config.model.patch_size}, "
          f"{config.model.num_classes} classes; GB = 1e9 bytes"
          + (f"; fits: within {HEADROOM:.0%} of {budget / GB:.1f} GB" if budget else ""))
    print("\n".join(table_lines(rows)))
    return 0
