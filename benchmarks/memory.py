"""How much memory does one training step need? An estimate per configuration, counted on CPU.

    python benchmarks/memory.py --preset resnet50 [--json FILE] [--batch 256]
        [--micro-batches 256,128,64,32] [--probe-batches 2,4] [--threads N] [key=value ...]

For stage 1/3 (stage 3 keeps what stage 1 keeps: the frozen policy runs without gradients) and
stage 2, the bytes of:

- parameters (all of the model, float32 whatever the AMP mode),
- gradients (of what trains: stage 1/3 the encoders and the classifier, stage 2 the policy),
- optimiser state (SGD momentum: one float32 copy of what trains; stage 2's Adam: two),
- the input batch (the whole effective batch sits on the device; micro-batches are views of it),
- activations kept for the backward pass: every tensor autograd saves, counted with
  torch.autograd.graph.saved_tensors_hooks and deduplicated by storage (parameters and the input
  batch left out, they are counted above). Counted at two small micro-batches (--probe-batches)
  and extrapolated linearly in the micro-batch (what does not grow with it, e.g. the bf16 copies
  of the weights under autocast, is the intercept). Stage 2 counts the rollout's states and what
  one PPO update saves;
- with activation checkpointing: the inputs of the checkpointed encoder passes (kept) plus the
  peak of the backward pass, which recomputes one encoder pass at a time (counted as the saved
  tensors of one encoder pass without checkpointing);
- the per-step logits of a micro-batch (float32, kept for the accuracy).

`estimated_bytes` is their sum. It leaves out what the framework allocates on its own (the CUDA
context, cuDNN workspaces, the allocator's fragmentation, the gradients of activations alive
during the backward pass), so a real run needs some headroom above it.
When CUDA is available every configuration also runs two real steps on the GPU (gradient
accumulation over micro-batches, as `glancefocus train` does) and reports
torch.cuda.max_memory_allocated of the second as `measured_bytes`.

Prints (and with --json writes) {"rows": [...], "settings": {...}}; one row per stage, micro-batch,
AMP mode and activation checkpointing, the authors' setting (float32, one pass of 256 images, no
checkpointing) marked with authors_setting=true.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import build_setup

from glancefocus.train.optim import freeze_for_stage, gfnet_sgd, set_train_modes
from glancefocus.train.ppo import (
    PPOLoss,
    collect_rollout,
    discounted_returns,
    normalise,
)
from glancefocus.train.supervised import GlanceFocusLoss

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GB = 1e9


# ----------------------------------------------------------------------------------------------
# counting saved tensors

class SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for backward, apart from `excluded` ones."""

    def __init__(self, excluded: list[torch.Tensor] = ()):
        self.excluded = {_storage_key(t) for t in excluded}
        self.storages: dict = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded:
            self.storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    def record(self, tensor: torch.Tensor) -> None:
        """Count a tensor something else keeps alive (e.g. a checkpointed pass's input)."""
        self.pack(tensor)

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def _storage_key(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return tensor.device, storage.data_ptr(), storage.nbytes()


def _autocast(amp: str):
    return torch.autocast("cpu", dtype=AMP_DTYPES[amp], enabled=amp != "none")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# stage 1/3

def stage1_activations(model, images, labels, amp: str, checkpointing: bool, dsn_ratio: float) -> dict:
    """Saved bytes of one stage-1 forward pass (and, with checkpointing, its recompute peak)."""
    model.set_activation_checkpointing(checkpointing)
    counter = SavedTensorCounter(excluded=[*model.parameters(), images])
    kept_inputs = []
    handles = []
    if checkpointing:  # the checkpoint keeps each encoder pass's input for its recomputation
        for encoder in (model.glance_encoder, model.focus_encoder):
            handles.append(encoder.register_forward_pre_hook(
                lambda module, args: kept_inputs.append(args[0])))
    loss_module = GlanceFocusLoss(model, dsn_ratio, random_locations=True)
    generator = torch.Generator().manual_seed(0)
    with counter.hooks(), _autocast(amp):
        loss, _ = loss_module(images, labels, generator)
    for handle in handles:
        handle.remove()
    for tensor in kept_inputs:
        counter.record(tensor)
    saved = counter.total
    del loss
    recompute = encoder_pass_bytes(model.focus_encoder, images, model.patch_size, amp) if checkpointing else 0
    model.set_activation_checkpointing(False)
    return {"saved": saved, "recompute": recompute}


def encoder_pass_bytes(encoder, images, patch_size: int, amp: str) -> int:
    """Saved bytes of one encoder pass with gradients: what a checkpointed pass rebuilds."""
    patches = images[:, :, :patch_size, :patch_size].contiguous(
        memory_format=torch.channels_last if _is_channels_last(images) else torch.contiguous_format)
    checkpointing, encoder.activation_checkpointing = encoder.activation_checkpointing, False
    counter = SavedTensorCounter(excluded=[*encoder.parameters(), patches])
    with counter.hooks(), _autocast(amp):
        pooled, _ = encoder(patches)
    encoder.activation_checkpointing = checkpointing
    del pooled
    return counter.total


def _is_channels_last(images: torch.Tensor) -> bool:
    return images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()


# ----------------------------------------------------------------------------------------------
# stage 2

def stage2_activations(model, images, labels, runtime, stage_config) -> dict:
    """The rollout's kept tensors and what one PPO update saves (float32: the policy's update
    runs outside autocast, and the rollout keeps its states in float32)."""
    generator = torch.Generator().manual_seed(0)
    rollout = collect_rollout(model, images, labels, runtime, generator)
    returns = normalise(discounted_returns(rollout.rewards, stage_config.gamma))
    ppo_loss = PPOLoss(model.policy, stage_config.ppo_clip, stage_config.value_coef,
                       stage_config.entropy_coef)
    # the rollout's states are counted above; the update's saved views of them are not new
    counter = SavedTensorCounter(excluded=[*model.parameters(), rollout.states])
    with counter.hooks():
        # the first pass evaluates the rollout (its log-probabilities, values and means kept)
        loss, _, evaluation = ppo_loss(rollout.states, rollout.actions, rollout.log_probs, returns)
    rollout.set_evaluation(evaluation)
    kept = tensor_bytes([rollout.states, rollout.actions, rollout.log_probs, rollout.values,
                         rollout.true_probs, rollout.correct])
    del loss
    return {"saved": kept + counter.total, "recompute": 0}


# ----------------------------------------------------------------------------------------------
# the table

def static_parts(model, stage: int) -> dict:
    """Parameters, gradients and optimiser state of `stage` (bytes; float32 master weights)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_state = 2 if stage == 2 else 1  # Adam: exp_avg and exp_avg_sq; SGD: the momentum
    return {"parameters_bytes": tensor_bytes(model.parameters()),
            "gradients_bytes": tensor_bytes(trainable),
            "optimizer_bytes": per_state * tensor_bytes(trainable)}


def linear_fit(probes: dict[int, int]) -> tuple[float, float]:
    """(slope per image, intercept) through the counts at two micro-batch sizes."""
    (small, at_small), (large, at_large) = sorted(probes.items())[:1] + sorted(probes.items())[-1:]
    slope = (at_large - at_small) / (large - small)
    return slope, at_small - slope * small


def probe(stage: int, model, probe_images: dict, runtime, config, amp: str,
          checkpointing: bool) -> dict:
    """Activation counts at each probe micro-batch: {size: {'saved', 'recompute'}}."""
    counts = {}
    for size, (images, labels) in probe_images.items():
        if stage == 2:
            counts[size] = stage2_activations(model, images, labels, runtime, config.train.stage2)
        else:
            counts[size] = stage1_activations(model, images, labels, amp, checkpointing,
                                              config.train.stage1.dsn_ratio)
    return counts


def make_row(stage: int, model, config, counts: dict, batch: int, micro: int, amp: str,
             checkpointing: bool) -> dict:
    parts = static_parts(model, stage)
    saved_slope, saved_base = linear_fit({b: c["saved"] for b, c in counts.items()})
    peak_slope, peak_base = linear_fit({b: c["recompute"] for b, c in counts.items()})
    size = config.data.image_size
    steps, classes = config.model.max_steps, config.model.num_classes
    row = {
        "stage": "2" if stage == 2 else "1/3",
        "effective_batch": batch, "micro_batch": micro, "amp": amp,
        "activation_checkpointing": checkpointing,
        "authors_setting": stage != 2 and micro == batch and amp == "none" and not checkpointing,
        **parts,
        "input_bytes": batch * config.model.in_chans * size * size * 4,
        # stage 2's update (and the rollout it keeps) covers the whole batch, micro-batch or not
        "activations_bytes": int(saved_slope * (batch if stage == 2 else micro) + saved_base),
        "recompute_peak_bytes": int(peak_slope * micro + peak_base),
        "logits_bytes": steps * micro * classes * 4,
    }
    row["estimated_bytes"] = sum(row[k] for k in (
        "parameters_bytes", "gradients_bytes", "optimizer_bytes", "input_bytes",
        "activations_bytes", "recompute_peak_bytes", "logits_bytes"))
    row["estimated_gb"] = round(row["estimated_bytes"] / GB, 2)
    return row


def build_rows(preset: str, batch: int, micro_batches: list[int], probe_batches: list[int],
               amps: list[str], overrides: tuple[str, ...] = (), cuda: bool = False) -> list[dict]:
    config, runtime, model, images, labels = build_setup(preset, max(probe_batches), "none", False,
                                                         "cpu", overrides)
    probe_images = {b: (images[:b].clone(), labels[:b].clone()) for b in probe_batches}
    rows = []
    for stage in (1, 2):
        stage_config = config.train.stage2 if stage == 2 else config.train.stage1
        freeze_for_stage(model, stage, stage_config)
        set_train_modes(model, stage, stage_config)
        # stage 2's memory does not depend on the AMP mode of its float32 update, nor on
        # checkpointing (the rollout runs without gradients): one set of rows per micro-batch
        variants = [("none", False)] if stage == 2 else [(a, c) for a in amps for c in (False, True)]
        for amp, checkpointing in variants:
            counts = probe(stage, model, probe_images, runtime, config, amp, checkpointing)
            for micro in micro_batches:
                row = make_row(stage, model, config, counts, batch, micro, amp, checkpointing)
                if cuda:
                    row["measured_bytes"] = measure_on_cuda(preset, stage, batch, micro, amp,
                                                            checkpointing, overrides)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# the real thing, on a GPU

def measure_on_cuda(preset: str, stage: int, batch: int, micro: int, amp: str,
                    checkpointing: bool, overrides: tuple[str, ...]) -> int:
    """torch.cuda.max_memory_allocated of a second real step (the first makes the optimiser
    state), with gradient accumulation over micro-batches as train_epoch does."""
    torch.cuda.empty_cache()
    config, runtime, model, images, labels = build_setup(
        preset, batch, amp, False, "cuda", (*overrides, f"train.micro_batch={micro}"))
    model.set_activation_checkpointing(checkpointing)
    stage_config = config.train.stage2 if stage == 2 else config.train.stage1
    freeze_for_stage(model, stage, stage_config)
    set_train_modes(model, stage, stage_config)
    step = _cuda_step(stage, model, config, runtime, images, labels, micro)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, images, labels, step
    return int(peak)


def _cuda_step(stage: int, model, config, runtime, images, labels, micro: int):
    if stage == 2:
        stage_config = config.train.stage2
        optimizer = torch.optim.Adam(model.policy.parameters(), lr=stage_config.ppo_lr)
        ppo_loss = PPOLoss(model.policy, stage_config.ppo_clip, stage_config.value_coef,
                           stage_config.entropy_coef)
        generator = runtime.generator(0, 2)

        def policy_step():
            rollout = collect_rollout(model, images, labels, runtime, generator, micro)
            returns = normalise(discounted_returns(rollout.rewards, stage_config.gamma))
            optimizer.zero_grad(set_to_none=True)
            loss, _, _ = ppo_loss(rollout.states, rollout.actions, rollout.log_probs, returns)
            loss.backward()
            optimizer.step()
        return policy_step
    optimizer = gfnet_sgd(model, 1, config.train.stage1)
    loss_module = GlanceFocusLoss(model, config.train.stage1.dsn_ratio, random_locations=True)
    scaler = runtime.grad_scaler()
    generator = runtime.generator(0, 1)

    def supervised_step():
        optimizer.zero_grad(set_to_none=True)
        for x, y in zip(images.split(micro), labels.split(micro)):
            with runtime.autocast():
                loss, _ = loss_module(x, y, generator)
            share = loss * (x.shape[0] / images.shape[0])
            (scaler.scale(share) if scaler is not None else share).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return supervised_step


# ----------------------------------------------------------------------------------------------

def summary_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'stage':>5} {'micro':>5} {'amp':>4} {'ckpt':>5} {'params':>7} {'grads':>7} "
             f"{'optim':>7} {'input':>7} {'activ':>7} {'recomp':>7} {'total GB':>8}"
             + (" measured" if any("measured_bytes" in r for r in rows) else "")]
    for r in rows:
        cells = [r["parameters_bytes"], r["gradients_bytes"], r["optimizer_bytes"], r["input_bytes"],
                 r["activations_bytes"], r["recompute_peak_bytes"]]
        line = (f"{r['stage']:>5} {r['micro_batch']:>5} {r['amp']:>4} "
                f"{'on' if r['activation_checkpointing'] else 'off':>5} "
                + " ".join(f"{c / GB:7.2f}" for c in cells) + f" {r['estimated_gb']:8.2f}")
        if "measured_bytes" in r:
            line += f" {r['measured_bytes'] / GB:8.2f}"
        lines.append(line + ("  <- the authors' setting" if r["authors_setting"] else ""))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet50")
    parser.add_argument("--batch", type=int, default=256, help="effective batch (train.batch_size)")
    parser.add_argument("--micro-batches", default="256,128,64,32")
    parser.add_argument("--probe-batches", default="2,4",
                        help="two micro-batch sizes counted on CPU, extrapolated linearly")
    parser.add_argument("--amp", default="none,bf16,fp16", help="AMP modes to count")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-cuda", action="store_true", help="skip the measured GPU steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    micro_batches = [int(b) for b in args.micro_batches.split(",")]
    probe_batches = [int(b) for b in args.probe_batches.split(",")]
    amps = args.amp.split(",")
    if len(set(probe_batches)) < 2 or any(a not in AMP_DTYPES for a in amps):
        parser.error("--probe-batches needs two different sizes; --amp takes none, bf16, fp16")
    if any(args.batch % m for m in micro_batches):
        parser.error(f"every micro-batch must divide --batch {args.batch}")
    cuda = torch.cuda.is_available() and not args.no_cuda
    rows = build_rows(args.preset, args.batch, micro_batches, probe_batches, amps,
                      tuple(args.overrides), cuda)
    result = {"rows": rows, "settings": {
        "preset": args.preset, "probe_batches": probe_batches, "method": (
            "saved_tensors_hooks on CPU at the probe micro-batches, linear in the micro-batch"),
        "cuda_measured": cuda, "torch": torch.__version__}}
    print("\n".join(summary_lines(rows)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
