"""GlanceFocusNet: the glance encoder, the focus encoder, the classifier and the patch policy,
wired as in the paper. `step` runs one glance or focus step, and picks every focus location
(the policy's mean or sample, or a uniform draw for exploring rows); `focus_steps` runs the focus
steps from a state. The full pass, every training recipe's loss and rollout, evaluation and the
early-exit predictor all drive them, so they cannot drift apart."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import crops
from .classifier import CascadedClassifier, RecurrentClassifier
from .config import ModelConfig
from .encoder import Encoder, create_backbone
from .macs import encoder_macs
from .policy import ACTION_SCORINGS, PatchPolicy, PolicyOutput


@dataclass
class StepState:
    """What one step hands to the next, for every image of the batch."""

    step: int                                # steps done so far (1 after the glance)
    feature_map: torch.Tensor                # [B, C, h, w] the last step's map: the policy's input
    classifier_state: torch.Tensor           # GRU hidden [1, B, H] or features so far [B, t*D]
    policy_hidden: Optional[torch.Tensor]    # [1, B, H]; None before the first focus step

    def select(self, index: torch.Tensor) -> "StepState":
        """The state of a subset of the batch (a bool mask or indices), e.g. images still running."""
        gru_like = self.classifier_state.dim() == 3
        return StepState(
            step=self.step,
            feature_map=self.feature_map[index],
            classifier_state=self.classifier_state[:, index] if gru_like else self.classifier_state[index],
            policy_hidden=None if self.policy_hidden is None else self.policy_hidden[:, index],
        )


@dataclass
class StepOutput:
    logits: torch.Tensor                     # [B, K] this step's prediction
    state: StepState
    box: torch.Tensor                        # [B, 4] pixels (x0, y0, x1, y1) looked at
    location: Optional[torch.Tensor] = None  # [B, 2] the focus location (None at the glance)
    aux_logits: Optional[torch.Tensor] = None  # [B, K] the encoder's own head (deep supervision)
    policy: Optional[PolicyOutput] = None    # the policy's mean, value and GRU state, if it ran


@dataclass
class GlanceFocusOutput:
    logits: torch.Tensor                     # [T, B, K], glance first
    locations: torch.Tensor                  # [T-1, B, 2] in [0, 1]^2
    boxes: torch.Tensor                      # [T, B, 4] pixels (x0, y0, x1, y1)
    aux_logits: Optional[torch.Tensor] = None  # [T, B, K] when asked for
    states: Optional[torch.Tensor] = None      # [T-1, B, C, h, w] when asked for (see FocusSteps)


@dataclass
class FocusSteps:
    """The focus steps after a given state, step by step along the first dimension."""

    logits: torch.Tensor                     # [S, B, K]
    locations: torch.Tensor                  # [S, B, 2] in [0, 1]^2, the locations looked at
    boxes: torch.Tensor                      # [S, B, 4] pixels (x0, y0, x1, y1)
    aux_logits: Optional[torch.Tensor] = None  # [S, B, K] when asked for
    # [S, B, C, h, w] float32, detached: the state maps that chose the S locations (a PPO
    # episode's states), when asked for
    states: Optional[torch.Tensor] = None


Locations = Union[None, str, torch.Tensor]


class GlanceFocusNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        _validate(config)
        self.config = config
        self.class_names: Optional[list[str]] = None
        self.exit_curve: Optional[dict] = None   # calibrated thresholds per budget (see exits.py)
        self.metrics: dict = {}
        build = dict(num_classes=config.num_classes, in_chans=config.in_chans,
                     pretrained_tag=config.pretrained_tag, input_size=config.patch_size,
                     **config.encoder_kwargs)
        glance_weights = config.pretrained if config.pretrained_glance is None else config.pretrained_glance
        self.glance_encoder = Encoder(create_backbone(config.arch, pretrained=glance_weights, **build))
        self.focus_encoder = Encoder(create_backbone(config.arch, pretrained=config.pretrained, **build))
        # whether the glance encoder's head holds pretrained weights for these classes: a frozen
        # glance encoder keeps such a head frozen, and trains a new one (see train/optim.py)
        self.pretrained_glance_head = self.glance_encoder.backbone.pretrained_head
        feature_dim, state_shape = self._probe_shapes()
        # counted once here: an encoder whose cost cannot all be counted is refused at once
        self.encoder_macs = encoder_macs(self.glance_encoder, (config.in_chans,) + (config.patch_size,) * 2,
                                         f"model.arch '{config.arch}'")
        self.feature_dim = feature_dim
        self.state_shape = state_shape
        if config.classifier == "recurrent":
            self.classifier = RecurrentClassifier(feature_dim, config.classifier_hidden, config.num_classes)
        else:
            self.classifier = CascadedClassifier(feature_dim, config.num_classes, config.max_steps)
        self.policy = PatchPolicy(state_shape[0], state_shape[1:], config.policy_hidden,
                                  encoder=config.policy_encoder, std=config.policy_std,
                                  action_scoring=config.policy_action_scoring)

    @torch.no_grad()
    def _probe_shapes(self):
        """Feature size and state-map shape, read off one forward pass at P x P."""
        encoder = self.glance_encoder
        was_training = encoder.training
        encoder.eval()
        p = self.config.patch_size
        needs_cnn = ("GFNet's encoders must give a spatial feature map at P x P: CNNs (e.g. "
                     "resnet50, densenet121, mobilenetv3_large_100, efficientnet_b2, regnety_016) "
                     "or vision transformers whose patch size divides P (e.g. deit_small_patch16_224 "
                     "at P 112)")
        try:
            pooled, fmap = encoder(torch.zeros(1, self.config.in_chans, p, p))
        except (AssertionError, RuntimeError, ValueError) as exc:  # e.g. P not a multiple of a ViT's patch
            raise ValueError(f"model.arch '{self.config.arch}' cannot encode a {p}x{p} patch "
                             f"({str(exc).splitlines()[0]}): {needs_cnn}") from None
        finally:
            encoder.train(was_training)
        if fmap.dim() != 4 or pooled.dim() != 2:
            raise ValueError(f"model.arch '{self.config.arch}' is not a CNN with a spatial feature "
                             f"map (its features are {tuple(fmap.shape)}): {needs_cnn}")
        return pooled.shape[1], tuple(fmap.shape[1:])

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    # ------------------------------------------------------------------------------------------
    def step(self, images: torch.Tensor, state: Optional[StepState] = None,
             location: Optional[torch.Tensor] = None, sample: bool = False,
             aux: bool = False, generator: Optional[torch.Generator] = None,
             explore: Optional[torch.Tensor] = None) -> StepOutput:
        """One step on full-resolution `images` [B, C, H, W].

        With no `state` this is the glance. Otherwise a focus step: the policy proposes where to
        look from the state (its mean, or `policy.sample` around it when `sample`), unless
        `location` [B, 2] is given, in which case the policy does not run. `explore` (bool [B]):
        those rows look at uniform random locations instead, drawn after the policy's noise from
        the same generator; the policy still runs for every row, so its GRU state advances.

        The policy acts without gradients: PPO scores the actions taken by re-running
        `policy.evaluate` on the recorded states, and the location is not differentiable anyway.
        """
        height, width = images.shape[-2:]
        p = self.config.patch_size
        if height < p or width < p:
            raise ValueError(f"images of {height}x{width} are smaller than the patch size {p}")
        policy_out = None
        if state is None:
            step = 1
            view = crops.glance(images, p, self.config.glance_interpolation, self.config.glance_antialias)
            box = images.new_tensor([0, 0, width, height], dtype=torch.long).expand(images.shape[0], 4)
            encoder, classifier_state, policy_hidden = self.glance_encoder, None, None
        else:
            step = state.step + 1
            if step > self.config.max_steps:
                raise ValueError(f"step {step} is past model.max_steps={self.config.max_steps}")
            policy_hidden = state.policy_hidden
            if location is None:
                policy_out, location = self._act(state, sample, generator, explore)
                policy_hidden = policy_out.hidden
            view = crops.crop(images, location, p)
            box = crops.crop_boxes(location, height, width, p)
            encoder, classifier_state = self.focus_encoder, state.classifier_state
        pooled, fmap = encoder(view)
        # the backbone's own dropout before the classifier heads (timm's drop_rate, which its
        # forward_head skips when it returns the pooled feature), only while the encoder trains
        pooled = F.dropout(pooled, getattr(encoder.backbone, "drop_rate", 0.0), encoder.training)
        logits, classifier_state = self.classifier(pooled, classifier_state, step)
        if step == 1 and self.config.glance_head == "encoder":
            logits = encoder.head(pooled)
        return StepOutput(
            logits=logits,
            state=StepState(step, fmap, classifier_state, policy_hidden),
            box=box, location=location, policy=policy_out,
            aux_logits=encoder.head(pooled) if aux else None,
        )

    @torch.no_grad()
    def _act(self, state: StepState, sample: bool, generator: Optional[torch.Generator],
             explore: Optional[torch.Tensor]) -> tuple[PolicyOutput, torch.Tensor]:
        """The policy's output and the location to look at: every focus step's one rule."""
        policy_out = self.policy(state.feature_map, state.policy_hidden)
        location = (self.policy.sample(policy_out.mean, generator) if sample
                    else policy_out.mean.float())
        if explore is not None:
            uniform = torch.rand(location.shape, generator=generator, device=location.device,
                                 dtype=location.dtype)
            location = torch.where(explore[:, None], uniform, location)
        return policy_out, location

    def focus_steps(self, images: torch.Tensor, state: StepState, locations: Optional[torch.Tensor] = None,
                    sample: bool = False, steps: Optional[int] = None, aux: bool = False,
                    generator: Optional[torch.Generator] = None,
                    explore: Optional[torch.Tensor] = None, keep_states: bool = False) -> FocusSteps:
        """The focus steps from `state` up to step `steps` (default model.max_steps).

        locations: None (the policy's, see `step`; `explore` as there, the same rows at every
        step) or a tensor [S, B, 2] of given locations. keep_states: also return the state maps
        that chose each location, for a PPO episode.
        """
        steps = steps or self.config.max_steps
        logits, locations_taken, boxes, aux_logits, states = [], [], [], [], []
        for t in range(steps - state.step):
            if keep_states:
                states.append(state.feature_map.detach().float())
            given = None if locations is None else locations[t]
            out = self.step(images, state, location=given, sample=sample, aux=aux,
                            generator=generator, explore=explore)
            state = out.state
            logits.append(out.logits)
            locations_taken.append(out.location.float())
            boxes.append(out.box)
            aux_logits.append(out.aux_logits)
        none = images.new_zeros(0, images.shape[0], self.config.num_classes, dtype=torch.float32)
        return FocusSteps(
            logits=_stacked(logits, none),
            locations=_stacked(locations_taken, none[..., :2]),
            boxes=_stacked(boxes, none[..., :4].long()),
            aux_logits=_stacked(aux_logits, none) if aux else None,
            states=_stacked(states, state.feature_map.detach().float()[None][:0]) if keep_states else None,
        )

    def forward(self, images: torch.Tensor, locations: Locations = None, sample: Optional[bool] = None,
                steps: Optional[int] = None, aux: bool = False,
                generator: Optional[torch.Generator] = None,
                keep_states: bool = False) -> GlanceFocusOutput:
        """All steps for every image (anytime prediction): the glance, then `focus_steps`.

        locations: None (the policy: samples in training mode, its mean in eval mode), 'random'
        (uniform, as in stage 1), or a tensor [T-1, B, 2] of given locations.
        """
        steps = steps or self.config.max_steps
        if sample is None:
            sample = self.training
        if isinstance(locations, str):
            if locations != "random":
                raise ValueError(f"locations must be None, 'random' or a tensor, got {locations!r}")
            locations = torch.rand(steps - 1, images.shape[0], 2, generator=generator,
                                   device=images.device if generator is None else generator.device)
            locations = locations.to(images.device)
        glance = self.step(images, aux=aux)
        focus = self.focus_steps(images, glance.state, locations, sample=sample, steps=steps,
                                 aux=aux, generator=generator, keep_states=keep_states)
        return GlanceFocusOutput(
            logits=_after(glance.logits, focus.logits),
            locations=focus.locations,
            boxes=_after(glance.box, focus.boxes),
            aux_logits=_after(glance.aux_logits, focus.aux_logits) if aux else None,
            states=focus.states,
        )

    def predict(self, images: torch.Tensor, budget: Optional[float] = None,
                thresholds: Optional[torch.Tensor] = None, top_k: int = 1) -> list:
        """Early-exit predictions, one per image (see predictor.Predictor): images that are
        confident enough leave the batch, so later steps compute only on the others. `images`
        are preprocessed as glancefocus.create_transform(model) does."""
        from .predictor import predict

        return predict(self, images, budget=budget, thresholds=thresholds, top_k=top_k)

    def macs(self) -> dict:
        """Multiply-adds per part and per step by the authors' rule, counted from the modules (see macs.py)."""
        from .macs import count_model_macs

        return count_model_macs(self)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.glance_encoder.activation_checkpointing = enabled
        self.focus_encoder.activation_checkpointing = enabled


def _stacked(steps: list, none: torch.Tensor) -> torch.Tensor:
    """The steps' tensors stacked along a new first dimension; `none` when there are none."""
    return torch.stack(steps) if steps else none


def _after(first: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """`first` [B, ...] then the steps `rest` [S, B, ...], stacked (as `first`'s dtype when
    there are none)."""
    return torch.cat([first[None], rest]) if len(rest) else first[None]


def _validate(config: ModelConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need(config.num_classes is not None,
         "model.num_classes is not set (training reads it from the data's class folders)")
    need(config.num_classes >= 1, f"model.num_classes must be >= 1, got {config.num_classes}")
    need(config.patch_size >= 8, f"model.patch_size must be >= 8 pixels, got {config.patch_size}")
    need(config.max_steps >= 1, f"model.max_steps must be >= 1, got {config.max_steps}")
    need(config.in_chans >= 1, f"model.in_chans must be >= 1, got {config.in_chans}")
    need(config.classifier in ("recurrent", "cascaded"),
         f"model.classifier must be 'recurrent' or 'cascaded', got {config.classifier!r}")
    need(config.glance_head in ("classifier", "encoder"),
         f"model.glance_head must be 'classifier' or 'encoder', got {config.glance_head!r}")
    need(config.classifier != "cascaded" or config.glance_head == "encoder",
         "model.glance_head must be 'encoder' for a cascaded classifier (it has no step-1 linear)")
    need(config.glance_interpolation in crops.INTERPOLATIONS,
         f"model.glance_interpolation must be one of {crops.INTERPOLATIONS}, "
         f"got {config.glance_interpolation!r}")
    need(config.policy_std > 0, f"model.policy_std must be > 0, got {config.policy_std}")
    need(config.policy_action_scoring in ACTION_SCORINGS,
         f"model.policy_action_scoring must be one of {ACTION_SCORINGS}, "
         f"got {config.policy_action_scoring!r}")


def create_model(arch: str, num_classes: Optional[int] = None, patch_size: Optional[int] = None,
                 max_steps: Optional[int] = None, pretrained: Union[bool, str] = False,
                 image_size: Optional[int] = None, **overrides) -> GlanceFocusNet:
    """A GFNet for `arch`: a preset name (the authors' configurations, 'demo') or any timm CNN.

    Unset arguments take the preset's values (or ModelConfig's defaults: P 96, T 5); the class
    count defaults to the demo's 10 for 'demo', else ImageNet's 1000. `image_size`, if given, is only checked against the patch size: the model takes any
    input at least P x P, square or not.
    """
    from .presets import default_model_section, default_num_classes, model_config_for

    fields = dict(overrides, pretrained=pretrained)
    if num_classes is not None:
        fields["num_classes"] = num_classes
    elif "num_classes" not in default_model_section(arch):
        fields["num_classes"] = default_num_classes(arch)
    if patch_size is not None:
        fields["patch_size"] = patch_size
    if max_steps is not None:
        fields["max_steps"] = max_steps
    config = model_config_for(arch, **fields)
    if image_size is not None and image_size < config.patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch size {config.patch_size}")
    return GlanceFocusNet(config)

