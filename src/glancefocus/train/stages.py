"""Run a training recipe on one run folder: the paper's three stages (as the authors' train.py
runs them), or the one-stage recipe (train.recipe=one-stage, see one_stage.py).

Each stage starts from the previous stage's result in the run folder (stage 2 from
RUN/stage1/last.pt, stage 3 from RUN/stage2/last.pt), or from `init`, a checkpoint given for the
first stage run. With `resume`, a stage that has a last.pt continues from it (a stage that
had finished has nothing left to do, unless its length was raised); a stage without one starts
as usual.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config import FOCUS_ON, RECIPES, RunConfig, to_dict
from ..data import build_datasets
from ..interrupts import TrainingInterrupted, stop_on_signals
from ..model import GlanceFocusNet
from .context import StageRun
from .faults import MicroBatchSize
from .fit import HEADROOM, agree_across_ranks, fit_to_device, needs_fitting
from .loaders import first_items
from .optim import describe_training
from .policy_stage import run_policy_stage
from .runtime import (
    STREAM_INIT,
    Runtime,
    amp_dtype,
    derive_seed,
    resolve_amp,
    seed_everything,
    start_runtime,
    stop_runtime,
)
from .state import (
    ONE_STAGE,
    check_same_run,
    last_checkpoint,
    load_initial_weights,
    load_weights,
    resume_changes,
    stage_name,
    stage_settings,
    write_run_config,
)
from .supervised_stage import run_supervised_stage

log = logging.getLogger("glancefocus.train")

ALL_STAGES = (1, 2, 3)


def train(config: RunConfig, stages: Optional[Sequence[int]] = None, resume: bool = False,
          init: Optional[str] = None, *, datasets=None, progress: bool = True,
          save_every: int = 200, trust_pickle: bool = False, overwrite: bool = False,
          on_checkpoint: Optional[Callable[[int, dict], None]] = None) -> dict[int, list[dict]]:
    """Train `stages` in order (None: all of the recipe's); returns each stage's metrics (per
    epoch; stage 2: per update). The one-stage recipe's only stage is ONE_STAGE.

    datasets: (train, eval, class_names) to use instead of building them from config.data.
    save_every: stage 2 also writes last.pt every this many updates.
    trust_pickle: `init` may be an authors' release file (a full pickle).
    overwrite: start again over the checkpoints of a run folder (without it that is refused).
    on_checkpoint(stage, training_state): called after every checkpoint is written.
    """
    stages = _check_stages(config, stages)
    out_dir = config.train.out_dir
    if resume and not any(last_checkpoint(out_dir, s).exists() for s in stages):
        raise FileNotFoundError(f"--resume: '{out_dir}' holds no checkpoint of "
                                f"{', '.join(map(stage_name, stages))} to resume")
    # fail before writing anything
    _refuse_overwrite(config, stages, resume, overwrite)
    _starting_point(config, stages[0], resume, init)
    train_set, eval_set, classes = datasets or build_datasets(config.data, config.model.in_chans)
    config = with_ppo_updates(with_class_count(config, classes), len(train_set),
                              int(os.environ.get("WORLD_SIZE", "1")))
    evaluated = first_items(eval_set, config.train.eval_images, "train.eval_images")
    runtime = start_runtime(config.train.device, config.train.amp)
    # SIGINT / SIGTERM only raise a flag: the stages save and raise TrainingInterrupted
    with stop_on_signals() as stop_flag, run_log(out_dir, runtime.is_main):
        try:
            if len(evaluated) < len(eval_set) and runtime.is_main:
                log.info("each epoch is scored on the first %d of the %d evaluation images "
                         "(train.eval_images)", len(evaluated), len(eval_set))
            config, choice = fit_run(config, stages, runtime)
            return _train_stages(config, stages, resume, init, (train_set, evaluated, classes),
                                 progress, save_every, trust_pickle, on_checkpoint, runtime,
                                 stop_flag, choice)
        finally:
            stop_runtime(runtime)


LOG_FILE = "train.log"


class _RunLogHandler(logging.Handler):
    """Appends to RUN/train.log once the run has written its folder, with what came before;
    a run that stops before writing anything (a bad setting) leaves no folder behind."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.waiting: list[str] = []
        self.file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self.file is None and not self._open():
                self.waiting.append(line)
                return
            self.file.write(line)
            self.file.flush()
        except Exception:
            self.handleError(record)

    def _open(self) -> bool:
        if not self.path.parent.is_dir():
            return False
        self.file = open(self.path, "a", encoding="utf-8")
        self.file.writelines(self.waiting)
        self.waiting = []
        return True

    def close(self) -> None:
        if self.file is None and self.waiting:
            self._open()
        if self.file is not None:
            self.file.close()
        super().close()


@contextlib.contextmanager
def run_log(out_dir, is_main: bool):
    """RUN/train.log: the run's log as the console shows it (warnings included, Python's
    warnings too), with times and levels; appended to, so a resumed run continues it."""
    if not is_main:
        yield
        return
    handler = _RunLogHandler(Path(out_dir) / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    package = logging.getLogger("glancefocus")
    package.addHandler(handler)
    level = package.level
    if package.getEffectiveLevel() > logging.INFO:  # the file has INFO whatever the console shows
        package.setLevel(logging.INFO)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        shown(message, category, filename, lineno, file, line)  # as before, on the console
        handler.handle(logging.LogRecord("py.warnings", logging.WARNING, filename, lineno,
                                         f"{category.__name__}: {message}", None, None))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
        package.setLevel(level)
        package.removeHandler(handler)
        handler.close()


def fit_run(config: RunConfig, stages: Sequence[int], runtime: Runtime):
    """(config, FitChoice or None): train.amp and train.micro_batch resolved for the run's
    device (see fit.py), the choice logged; the runtime's AMP mode set to the resolved one."""
    mode, _, warning = resolve_amp(config.train.amp, runtime.device)
    if warning and runtime.is_main:
        log.warning(warning)
    choice = None
    if needs_fitting(config):
        config, choice = fit_to_device(config, runtime.device, runtime.world_size, stages)
        config = agree_across_ranks(choice, config, runtime)
        if runtime.is_main:
            log.info(choice.line(runtime.device, config.train.batch_size // runtime.world_size,
                                 runtime.world_size))
            if not choice.fits:
                log.warning("the estimated memory of a step (%.2f GB) is above %.0f%% of the "
                            "budget (%.1f GB) even at a micro-batch of 1 with activation "
                            "checkpointing: the run may run out of memory",
                            choice.largest_estimate / 1e9, HEADROOM * 100, choice.budget / 1e9)
    elif not isinstance(config.train.micro_batch, int) or config.train.micro_batch < 0:
        raise ValueError("train.micro_batch must be a number of images >= 0 (0: the whole "
                         f"batch) or 'auto', got {config.train.micro_batch!r}")
    runtime.amp_dtype = amp_dtype(mode, runtime.device)
    return config, choice


def with_class_count(config: RunConfig, classes: Sequence[str]) -> RunConfig:
    """`config` with model.num_classes read from the data when unset; checked when set."""
    if config.model.num_classes is None:
        model = dataclasses.replace(config.model, num_classes=len(classes))
        return dataclasses.replace(config, model=model)
    if len(classes) != config.model.num_classes:
        raise ValueError(f"the data has {len(classes)} classes but model.num_classes is "
                         f"{config.model.num_classes}; set model.num_classes={len(classes)} "
                         "(or leave it unset to read it from the data)")
    return config


AUTO_PPO_UPDATES_MIN = 100


def with_ppo_updates(config: RunConfig, train_images: int, world_size: int = 1) -> RunConfig:
    """`config` with train.stage2.updates='auto' sized from the dataset: two epochs of
    updates, at least AUTO_PPO_UPDATES_MIN (a small dataset's epochs are few updates)."""
    stage2 = config.train.stage2
    if stage2.updates != "auto":
        return config
    per_epoch = math.ceil(math.ceil(train_images / world_size)
                          / (config.train.batch_size // world_size))
    updates = max(AUTO_PPO_UPDATES_MIN, 2 * per_epoch)
    train = dataclasses.replace(config.train, stage2=dataclasses.replace(stage2, updates=updates))
    return dataclasses.replace(config, train=train)


def _refuse_overwrite(config: RunConfig, stages: Sequence[int], resume: bool,
                      overwrite: bool) -> None:
    """A run folder's checkpoints are replaced only when asked (--overwrite)."""
    if overwrite:
        return
    for stage in stages:
        last = last_checkpoint(config.train.out_dir, stage)
        if last.exists() and not resume:
            raise ValueError(
                f"'{last}' exists: train.out_dir='{config.train.out_dir}' holds a run. Continue "
                "it with --resume, start it again with --overwrite, or choose another "
                "train.out_dir")


def _train_stages(config, stages, resume, init, datasets, progress, save_every, trust_pickle,
                  on_checkpoint, runtime, stop_flag, choice=None) -> dict[int, list[dict]]:
    """train()'s body, with the runtime started and the stop signals handled."""
    out_dir = config.train.out_dir
    train_set, eval_set, classes = datasets
    history = {}
    micro = MicroBatchSize(config.train.micro_batch)  # halved by out-of-memory errors
    for position, stage in enumerate(stages):
        # between stages the previous one is saved (under torchrun the stage loops decide together)
        if stop_flag.requested and position > 0 and not runtime.distributed:
            raise TrainingInterrupted(stop_flag.signum,
                                      last_checkpoint(out_dir, stages[position - 1]))
        # the first model is built (its pretrained weights fetched) before anything is written
        model, resume_state = _prepare_model(config, stage, runtime, resume,
                                             init if position == 0 else None, trust_pickle)
        if position == 0 and runtime.is_main:
            write_run_config(out_dir, to_dict(config))
        model.class_names = list(classes)
        run = StageRun(stage, config, model, train_set, eval_set, runtime, resume_state,
                       progress, save_every, on_checkpoint, stop_flag, micro=micro,
                       fit=choice if position == 0 else None)
        history[stage] = (run_policy_stage if stage == 2 else run_supervised_stage)(run)
        # a collective: no process reads this stage's last.pt before the main one wrote it
        runtime.check_ranks_agree(model)
        if runtime.distributed and runtime.is_main:
            log.info("%s: the %d processes hold identical weights", stage_name(stage),
                     runtime.world_size)
    return history


def _check_stages(config: RunConfig, stages: Optional[Sequence[int]]) -> tuple[int, ...]:
    """The stages to run, checked against the recipe."""
    recipe = config.train.recipe
    if recipe not in RECIPES:
        raise ValueError(f"train.recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "one-stage":
        if stages is not None and tuple(stages) != (ONE_STAGE,):
            raise ValueError("train.recipe=one-stage trains in one run, which has no stages to "
                             "choose: drop --stage (or use train.recipe=three-stage)")
        if config.train.one_stage.epochs < 1:
            raise ValueError(f"train.one_stage.epochs must be >= 1, got {config.train.one_stage.epochs}")
        _check_one_stage_settings(config.train.one_stage)
        return (ONE_STAGE,)
    stages = ALL_STAGES if stages is None else tuple(stages)
    if not stages or any(s not in ALL_STAGES for s in stages) or list(stages) != sorted(set(stages)):
        raise ValueError(f"stages must be a rising sequence of 1, 2, 3, got {list(stages)}")
    for stage in stages:
        stage_config = getattr(config.train, f"stage{stage}")
        if stage == 2 and isinstance(stage_config.updates, str) and stage_config.updates != "auto":
            raise ValueError("train.stage2.updates must be a number of PPO updates or 'auto', "
                             f"got {stage_config.updates!r}")
        if stage_config.epochs < 1 and not (stage == 2 and (stage_config.updates == "auto"
                                                            or stage_config.updates > 0)):
            raise ValueError(f"train.stage{stage}.epochs must be >= 1, got {stage_config.epochs}")
    _check_logit_limit(config.train.stage2, "stage2")
    return stages


def _check_logit_limit(settings, section: str) -> None:
    limit = settings.policy_logit_limit
    if limit is not None and not limit > 0:
        raise ValueError(f"train.{section}.policy_logit_limit must be > 0 (or null: no limit), "
                         f"got {limit}")


def _check_one_stage_settings(settings) -> None:
    for key in ("random_fraction_start", "random_fraction_end"):
        value = getattr(settings, key)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"train.one_stage.{key} must be in [0, 1], got {value}")
    for key in ("focus_fraction", "focus_fraction_end"):
        value = getattr(settings, key)
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"train.one_stage.{key} must be in (0, 1], got {value}")
    if settings.ppo_every < 1:
        raise ValueError(f"train.one_stage.ppo_every must be >= 1, got {settings.ppo_every}")
    if settings.ppo_min_rollout < 0:
        raise ValueError("train.one_stage.ppo_min_rollout must be >= 0 (0: off), got "
                         f"{settings.ppo_min_rollout}")
    if settings.focus_on not in FOCUS_ON:
        raise ValueError("train.one_stage.focus_on must be 'first' or 'uncertain', got "
                         f"{settings.focus_on!r}")
    _check_logit_limit(settings, "one_stage")
    if not settings.glance_loss_weight > 0:
        raise ValueError("train.one_stage.glance_loss_weight must be > 0, got "
                         f"{settings.glance_loss_weight}")


def _starting_point(config: RunConfig, stage: int, resume: bool, init: Optional[str]):
    """Where the stage's weights come from: ('resume', its last.pt), ('init', CKPT),
    ('previous', the previous stage's last.pt) or ('fresh', None)."""
    last = last_checkpoint(config.train.out_dir, stage)
    if resume and last.exists():
        return "resume", last
    if init is not None:
        if not Path(init).is_file():
            raise FileNotFoundError(f"--init: checkpoint '{init}' does not exist")
        return "init", Path(init)
    if stage in (1, ONE_STAGE):
        return "fresh", None
    previous = last_checkpoint(config.train.out_dir, stage - 1)
    if not previous.exists():
        raise FileNotFoundError(
            f"stage {stage} starts from stage {stage - 1}'s result, but '{previous}' does not "
            f"exist: run --stage {stage - 1} first, or give a checkpoint with --init")
    return "previous", previous


def _prepare_model(config: RunConfig, stage: int, runtime: Runtime, resume: bool,
                   init: Optional[str], trust_pickle: bool = False):
    """The stage's model on the run's device, and the training state to resume (or None)."""
    kind, path = _starting_point(config, stage, resume, init)
    seed_everything(derive_seed(config.train.seed, STREAM_INIT, stage))  # the initial weights
    # only a fresh stage 1 needs model.pretrained; every other start loads a checkpoint
    model = GlanceFocusNet(config.model if kind == "fresh"
                           else dataclasses.replace(config.model, pretrained=False,
                                                    pretrained_glance=None))
    resume_state = None
    if kind == "init":
        fresh = load_initial_weights(model, path, trust_pickle)
        if runtime.is_main:
            log.info("%s: starting from %s%s", stage_name(stage), path,
                     f"; new classes, so these layers start fresh: {', '.join(fresh)}" if fresh else "")
    elif path is not None:
        data = load_weights(model, path, config.model, trust_pickle)
        if kind == "resume":
            check_same_run(data["config"], to_dict(config), path)
            resume_state = data["training"]
            if runtime.is_main:
                for change in resume_changes(data["config"], to_dict(config), resume_state,
                                             stage, runtime.world_size):
                    log.warning("%s: resuming %s", stage_name(stage), change)
        if kind == "previous" and not (data.get("training") or {}).get("finished", False):
            raise ValueError(f"stage {stage - 1} has not finished ('{path}'): continue it "
                             f"with --stage {stage - 1} --resume first")
        if runtime.is_main:
            log.info("%s: %s %s", stage_name(stage),
                     "resuming from" if kind == "resume" else "starting from", path)
    if runtime.is_main:
        log.info(describe_training(model, stage, stage_settings(config.train, stage)))
    model.to(runtime.device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    model.set_activation_checkpointing(config.train.activation_checkpointing)
    return model, resume_state
