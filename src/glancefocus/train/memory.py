"""How much memory one training step needs: counted from what autograd saves, not guessed.

For stages 1 and 3 (stage 3 keeps what stage 1 keeps: its frozen policy runs without gradients),
stage 2 and the one-stage recipe, the bytes of:

- parameters (all of the model, float32 whatever the AMP mode; in stage 2 also the copies
  of the frozen encoders with BatchNorm folded, which its rollout runs),
- gradients (of what trains: stages 1/3 the encoders and the classifier, stage 2 the policy,
  the one-stage recipe all of them),
- optimiser state (SGD momentum: one float32 copy of what trains; the policy's Adam: two),
- the input batch (each process's whole batch sits on the device; micro-batches are views of it),
- activations kept for the backward pass: every tensor autograd saves, counted with
  torch.autograd.graph.saved_tensors_hooks and deduplicated by storage (parameters and the input
  batch left out, they are counted above). Counted at two small micro-batches (PROBE_BATCHES) and
  extrapolated linearly in the micro-batch (what does not grow with it, e.g. the 16-bit copies of
  the weights under autocast, is the intercept). Stage 2 counts the rollout's kept tensors and
  what one PPO update saves, over the whole batch (its update is not split into micro-batches);
  the one-stage recipe adds to stage 1's count the rollout states of `ppo_every` steps' batches
  (or of `ppo_min_rollout` images and one batch more, when larger) and the PPO update on them;
- with activation checkpointing: the inputs of the checkpointed encoder passes (kept) plus the
  peak of the backward pass, which recomputes one encoder pass at a time (counted as the saved
  tensors of one encoder pass without checkpointing);
- the per-step logits of a micro-batch (float32, kept for the accuracy).

`estimated_bytes` is their sum. It leaves out what the framework allocates on its own (the CUDA
context, cuDNN workspaces, the allocator's fragmentation, the gradients of activations alive
during the backward pass), so a run needs headroom above it: fit.py asks for 20 %.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import RunConfig, to_dict
from ..folding import conv_batchnorm_pairs
from .optim import freeze_for_stage, set_train_modes
from .ppo import PPOLoss, collect_rollout, discounted_returns, normalise
from .runtime import Runtime
from .state import ONE_STAGE
from .supervised import GlanceFocusLoss

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_BATCHES = (2, 4)
"""The micro-batches whose saved tensors are counted; the rest is extrapolated linearly."""
GB = 1e9
KINDS = ("1/3", "2", "one-stage")
"""What a row estimates: stages 1 and 3, stage 2, or the one-stage recipe's step."""


# ----------------------------------------------------------------------------------------------
# counting saved tensors

class SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for backward, apart from `excluded` ones."""

    def __init__(self, excluded=()):
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
    # the storage itself (views share it), which fake tensors have too, unlike a data pointer
    return tensor.device, tensor.untyped_storage()._cdata


def autocast(amp: str, device_type: str):
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def stage1_activations(model, images, labels, amp: str, checkpointing: bool,
                       dsn_ratio: float) -> dict:
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
    generator = torch.Generator(images.device).manual_seed(0)
    with counter.hooks(), autocast(amp, images.device.type):
        loss, _ = loss_module(images, labels, generator)
    for handle in handles:
        handle.remove()
    for tensor in kept_inputs:
        counter.record(tensor)
    saved = counter.total
    del loss
    recompute = (encoder_pass_bytes(model.focus_encoder, images, model.patch_size, amp)
                 if checkpointing else 0)
    model.set_activation_checkpointing(False)
    return {"saved": saved, "recompute": recompute}


def encoder_pass_bytes(encoder, images, patch_size: int, amp: str) -> int:
    """Saved bytes of one encoder pass with gradients: what a checkpointed pass rebuilds."""
    layout = torch.channels_last if _is_channels_last(images) else torch.contiguous_format
    patches = images[:, :, :patch_size, :patch_size].contiguous(memory_format=layout)
    checkpointing, encoder.activation_checkpointing = encoder.activation_checkpointing, False
    counter = SavedTensorCounter(excluded=[*encoder.parameters(), patches])
    with counter.hooks(), autocast(amp, images.device.type):
        pooled, _ = encoder(patches)
    encoder.activation_checkpointing = checkpointing
    del pooled
    return counter.total


def folded_copy_bytes(encoder) -> int:
    """The bytes of the encoder's copy with BatchNorm folded that stage 2's rollout runs
    (folding.py; 0 when nothing folds), counted without making the copy: the backbone's
    tensors less each folded BatchNorm's, plus a bias for a convolution that had none."""
    backbone = encoder.backbone
    pairs = conv_batchnorm_pairs(backbone)
    if not pairs:
        return 0
    total = tensor_bytes([*backbone.parameters(), *backbone.buffers()])
    for conv_name, bn_name in pairs:
        conv, bn = backbone.get_submodule(conv_name), backbone.get_submodule(bn_name)
        total -= tensor_bytes([*bn.parameters(), *bn.buffers()])
        if conv.bias is None:
            total += conv.out_channels * conv.weight.element_size()
    return total


def _is_channels_last(images: torch.Tensor) -> bool:
    return (images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
            and not images.is_contiguous())


def stage2_activations(model, images, labels, stage_config) -> dict:
    """The rollout's kept tensors and what one PPO update saves (float32: the policy's update
    runs outside autocast, and the rollout keeps its states in float32)."""
    runtime = Runtime(images.device)
    generator = torch.Generator(images.device).manual_seed(0)
    # folding would copy the fake encoders, and adds no saved tensor (static_parts counts
    # the copies' bytes)
    rollout = collect_rollout(model, images, labels, runtime, generator, fold=False)
    returns = normalise(discounted_returns(rollout.rewards, stage_config.gamma))
    ppo_loss = PPOLoss(model.policy, stage_config.ppo_clip, stage_config.value_coef,
                       stage_config.entropy_coef)
    # the rollout's states are counted below; the update's saved views of them are not new
    counter = SavedTensorCounter(excluded=[*model.parameters(), rollout.states])
    with counter.hooks():
        # the first pass evaluates the rollout (its log-probabilities, values and means kept)
        loss, _, evaluation = ppo_loss(rollout.states, rollout.actions, rollout.log_probs,
                                       returns)
    rollout.set_evaluation(evaluation)
    kept = tensor_bytes([rollout.states, rollout.actions, rollout.log_probs, rollout.values,
                         rollout.true_probs, rollout.correct])
    del loss
    return {"saved": kept + counter.total, "recompute": 0}


# ----------------------------------------------------------------------------------------------
# counts at the probe micro-batches, and the estimate they give

@dataclass
class Counts:
    """Saved bytes per image and fixed, of one kind of step at one AMP mode and checkpointing."""
    saved_slope: float
    saved_base: float
    recompute_slope: float = 0.0
    recompute_base: float = 0.0


def linear_fit(probes: dict) -> tuple[float, float]:
    """(slope per image, intercept) through the counts at the smallest and largest probe."""
    (small, at_small), (large, at_large) = sorted(probes.items())[0], sorted(probes.items())[-1]
    slope = (at_large - at_small) / (large - small)
    return slope, at_small - slope * small


_COUNTED: dict = {}
"""Counts and static parts per counted setup, for the life of the process."""


class MemoryCounter:
    """Counts the saved tensors of a model of `config` (its own copy, so that a run's model, its
    BatchNorm statistics and the random streams are left as they were) and estimates a step's
    bytes from them. Counts are cached per (kind, AMP mode, checkpointing).

    On a CPU the count runs on fake tensors (torch's FakeTensorMode: every tensor has its shape,
    dtype, device and storage, and no data), so nothing is computed: the same saved tensors in a
    fraction of the time, bf16 too where the CPU would emulate it. On a GPU it runs for real
    (fast there), with that device's autocast."""

    def __init__(self, config: RunConfig, device="cpu", probe_batches=PROBE_BATCHES,
                 fake: Optional[bool] = None):
        self.config = config
        self.device = torch.device(device)
        if config.model.num_classes is None:
            raise ValueError("counting memory needs model.num_classes (training reads it from "
                             "the data)")
        self.fake = self.device.type == "cpu" if fake is None else fake
        self.probe_batches = tuple(probe_batches)
        self._mode = None
        self._model = None
        # counts depend only on these: a process counting the same setup again reuses them
        train = config.train
        key = json.dumps([str(self.device), self.fake, self.probe_batches,
                          to_dict(config.model), config.data.image_size, train.channels_last,
                          to_dict(train.stage1), to_dict(train.stage2), to_dict(train.one_stage)],
                         sort_keys=True, default=str)
        shared = _COUNTED.setdefault(key, {"counts": {}, "static": {}})
        self._cache, self._static = shared["counts"], shared["static"]

    @property
    def model(self):
        """The counted model, built when first needed (fake on a CPU, see the class docstring)."""
        if self._model is None:
            self._model = self._build_model()
        return self._model

    def _build_model(self):
        from ..model import GlanceFocusNet

        config = self.config
        model_config = dataclasses.replace(config.model, pretrained=False, pretrained_glance=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if not self.fake:
                model = GlanceFocusNet(model_config).to(self.device)
                if config.train.channels_last:
                    model.to(memory_format=torch.channels_last)
                return model
            from torch._subclasses.fake_tensor import FakeTensorMode

            with torch.device("meta"):
                model = GlanceFocusNet(model_config)
            if config.train.channels_last:  # to_empty keeps the layout
                model.to(memory_format=torch.channels_last)
            self._mode = FakeTensorMode(allow_non_fake_inputs=True)
            with self._mode:
                return model.to_empty(device=self.device)

    @contextlib.contextmanager
    def _context(self):
        """Fake tensors (on a CPU), with the distributions' value checks off: a fake tensor has
        no values to check."""
        if self._mode is None:
            yield
            return
        validate = torch.distributions.Distribution._validate_args
        torch.distributions.Distribution.set_default_validate_args(False)
        try:
            with self._mode:
                yield
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)

    def _probe_inputs(self, batch: int):
        generator = torch.Generator().manual_seed(batch)
        size, channels = self.config.data.image_size, self.config.model.in_chans
        images = torch.randn(batch, channels, size, size, generator=generator).to(self.device)
        if self.config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(self.config.model.num_classes, (batch,), generator=generator)
        return images, labels.to(self.device)

    def counts(self, kind: str, amp: str, checkpointing: bool) -> Counts:
        if kind == "2":
            amp, checkpointing = "none", False  # float32 update; the rollout has no gradients
        key = (kind, amp, checkpointing)
        if key not in self._cache:
            self._cache[key] = self._count(kind, amp, checkpointing)
        return self._cache[key]

    def _count(self, kind: str, amp: str, checkpointing: bool) -> Counts:
        if kind == "one-stage":  # stage 1's step, plus the rollout (counted as stage 2's)
            return self.counts("1/3", amp, checkpointing)
        train = self.config.train
        stage, settings = (2, train.stage2) if kind == "2" else (1, train.stage1)
        saved, recompute = {}, {}
        model = self.model  # built first: on a CPU it makes the fake-tensor mode
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._context():
            freeze_for_stage(model, stage, settings)
            set_train_modes(model, stage, settings)
            for batch in self.probe_batches:
                images, labels = self._probe_inputs(batch)
                if stage == 2:
                    counted = stage2_activations(model, images, labels, settings)
                else:
                    counted = stage1_activations(model, images, labels, amp, checkpointing,
                                                 settings.dsn_ratio)
                saved[batch], recompute[batch] = counted["saved"], counted["recompute"]
        return Counts(*linear_fit(saved), *linear_fit(recompute))

    def static_parts(self, kind: str) -> dict:
        """Parameters, gradients and optimiser state of `kind` (bytes; float32 master weights)."""
        if kind not in self._static:
            model, train = self.model, self.config.train
            stage = {"1/3": 1, "2": 2, "one-stage": ONE_STAGE}[kind]
            freeze_for_stage(model, stage, train.one_stage if stage == ONE_STAGE else
                             getattr(train, f"stage{stage}"))
            trainable = [p for p in model.parameters() if p.requires_grad]
            policy = [p for p in model.policy.parameters() if p.requires_grad]
            if kind == "2":
                optimizer = 2 * tensor_bytes(trainable)  # Adam: exp_avg and exp_avg_sq
            else:  # SGD momentum, and (one-stage) the policy's Adam besides
                others = [p for p in trainable if all(p is not q for q in policy)]
                optimizer = tensor_bytes(others if kind == "one-stage" else trainable)
                if kind == "one-stage":
                    optimizer += 2 * tensor_bytes(policy)
            parameters = tensor_bytes(model.parameters())
            if kind == "2":  # the rollout's frozen encoders with BatchNorm folded (folding.py)
                parameters += sum(folded_copy_bytes(e) for e in (model.glance_encoder,
                                                                 model.focus_encoder))
            self._static[kind] = {"parameters_bytes": parameters,
                                  "gradients_bytes": tensor_bytes(trainable),
                                  "optimizer_bytes": optimizer}
        return self._static[kind]

    def estimate(self, kind: str, batch: int, micro: int, amp: str,
                 checkpointing: bool) -> dict:
        """The bytes of one step of `kind` on a process's batch of `batch` images in forward
        passes of `micro`, with its parts (see the module docstring)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        counts = self.counts(kind, amp, checkpointing)
        config = self.config
        size, steps = config.data.image_size, config.model.max_steps
        row = {"stage": kind, "effective_batch": batch, "micro_batch": micro,
               "amp": "none" if kind == "2" else amp,
               "activation_checkpointing": checkpointing and kind != "2",
               **self.static_parts(kind),
               "input_bytes": batch * config.model.in_chans * size * size * 4}
        if kind == "2":  # the update (and the rollout it keeps) covers the whole batch
            row["activations_bytes"] = int(counts.saved_slope * batch + counts.saved_base)
        else:
            row["activations_bytes"] = int(counts.saved_slope * micro + counts.saved_base)
        if kind == "one-stage":  # ppo_every steps of rollout states, and the update on them
            ppo = self.counts("2", "none", False)
            one = config.train.one_stage
            # a rollout that waits for ppo_min_rollout images holds fewer than one batch more
            images = max(batch * one.ppo_every, one.ppo_min_rollout + batch - 1)
            row["rollout_bytes"] = int(ppo.saved_slope * images + ppo.saved_base)
        row["recompute_peak_bytes"] = (int(counts.recompute_slope * micro + counts.recompute_base)
                                       if row["activation_checkpointing"] else 0)
        row["logits_bytes"] = steps * micro * config.model.num_classes * 4
        row["estimated_bytes"] = sum(v for k, v in row.items()
                                     if k.endswith("_bytes") and k != "estimated_bytes")
        row["estimated_gb"] = round(row["estimated_bytes"] / GB, 2)
        return row


def kinds_of(recipe: str, stages: Optional[tuple] = None) -> tuple[str, ...]:
    """The kinds of step a run of `recipe` (and `stages` of it, when given) takes."""
    if recipe == "one-stage":
        return ("one-stage",)
    stages = stages or (1, 2, 3)
    kinds = []
    if any(s in (1, 3) for s in stages):
        kinds.append("1/3")
    if 2 in stages:
        kinds.append("2")
    return tuple(kinds)
