"""Stages 1 and 3, and the one-stage recipe: train the encoders and the classifier, epoch by epoch.

Stage 1 looks at uniform random locations; stage 3 at locations sampled from the (frozen)
stage-2 policy; the one-stage recipe at both, and updates the policy with PPO after every step
(see one_stage.py). SGD with per-part learning rates and a cosine schedule per epoch; after each
epoch the BatchNorm statistics are recomputed for the final weights (see batchnorm.py), then the
model is evaluated (stage 1 with random locations, the others with the policy) and checkpointed.
"""
from __future__ import annotations

import contextlib
import logging
import time

from ..interrupts import UntilStopped
from .batchnorm import recalibrate_batchnorm
from .context import StageRun
from .evaluation import evaluate_anytime
from .fit import confirm_on_cuda
from .loaders import check_bad_files, make_loader, per_process_batch
from .one_stage import InterleavedPPO, focus_fraction, random_fraction
from .one_stage_loss import OneStageLoss
from .optim import Optimizers, freeze_for_stage, gfnet_sgd, set_cosine_lr, set_train_modes
from .runtime import STREAM_BATCHNORM, STREAM_GLOBAL, STREAM_LOCATIONS
from .state import ONE_STAGE, stage_name
from .supervised import GlanceFocusLoss, format_steps, train_epoch

log = logging.getLogger("glancefocus.train")


def run_supervised_stage(run: StageRun) -> list[dict]:
    model, runtime, config, stage = run.model, run.runtime, run.config, run.stage
    stage_config = run.stage_config
    name = stage_name(stage)
    freeze_for_stage(model, stage, stage_config)
    optimizer = gfnet_sgd(model, stage, stage_config)
    scaler = runtime.grad_scaler()
    batch_size = per_process_batch(config.train.batch_size, runtime)
    learner = None
    if stage == ONE_STAGE:
        plain_loss = OneStageLoss(model, stage_config.dsn_ratio,
                                  glance_weight=stage_config.glance_loss_weight,
                                  focus_fraction=stage_config.focus_fraction,
                                  focus_on=stage_config.focus_on)
        # the classifier's DistributedDataParallel leaves the policy out: PPO trains it
        with _policy_frozen(model):
            loss_module = runtime.wrap(plain_loss)
        learner = InterleavedPPO(model, plain_loss, stage_config, runtime, run.guard)
        optimizers = Optimizers(sgd=optimizer, ppo=learner.optimizer)
    else:
        plain_loss = GlanceFocusLoss(model, stage_config.dsn_ratio, random_locations=stage == 1)
        loss_module = runtime.wrap(plain_loss)
        optimizers = optimizer
    resumed = run.restore(optimizers, scaler) if run.resume else {"epoch": 0, "update": 0}
    start = resumed["epoch"]
    recorder = run.recorder("epoch")
    if learner is not None:
        learner.updates = resumed["update"]
        learner.recorder = run.recorder("update", file_name="ppo.csv")
    locations = "random" if stage == 1 else None
    history = []
    if start >= stage_config.epochs and runtime.is_main:
        log.info("%s: all %d epochs were done already", name, stage_config.epochs)
    for epoch in range(start, stage_config.epochs):
        began = time.time()
        # everything random in an epoch follows from (seed, stage, epoch, rank): resume is exact
        runtime.seed_process(run.seed, STREAM_GLOBAL, stage, epoch)
        set_cosine_lr(optimizer, epoch, stage_config.epochs, stage_config.warmup_epochs)
        set_train_modes(model, stage, stage_config)
        if learner is not None:
            plain_loss.random_fraction = random_fraction(stage_config, epoch)
            plain_loss.focus_fraction = focus_fraction(stage_config, epoch)
            learner.warn = epoch > 0  # the first epoch's encoders are new: rewards near 0 expected
        metrics = train_epoch(
            loss_module, model, UntilStopped(_epoch_batches(run, batch_size, epoch), run.stop_poll),
            optimizer, runtime, run.guard,
            steps=model.config.max_steps, micro_batch=run.micro,
            channels_last=config.train.channels_last, scaler=scaler,
            generator=runtime.generator(run.seed, STREAM_LOCATIONS, stage, epoch),
            description=f"{name} epoch {epoch + 1}/{stage_config.epochs}",
            progress=run.progress, after_step=learner and learner.after_step)
        if epoch == start:
            confirm_on_cuda(runtime.device, run.fit, f"{name} epoch {epoch + 1}")
        if run.stop_requested():
            # a mid-epoch stop: keep the weights, but --resume restarts this epoch from last.pt
            raise run.interrupted(run.save_interrupted(epoch))
        if learner is not None:
            learner.finish_epoch()
        trained = time.time()
        check_bad_files(run.train_set)
        metrics["bad_files"] = _bad_file_count(run.train_set)
        if learner is not None:
            metrics.update(random_fraction=plain_loss.random_fraction,
                           focus_fraction=plain_loss.focus_fraction, **learner.epoch_summary())
        recalibrate_batchnorm(model, plain_loss, _epoch_batches(run, batch_size, epoch), runtime,
                              runtime.generator(run.seed, STREAM_BATCHNORM, stage, epoch),
                              config.train.channels_last)
        if learner is not None:
            plain_loss.take_episodes()  # the recalibration's forward passes update nothing
        runtime.share_buffers(model)
        evaluation = evaluate_anytime(model, run.eval_set, runtime, batch_size, locations,
                                      seed=run.seed, num_workers=config.data.num_workers)
        metrics = {"lr": [g["lr"] for g in optimizer.param_groups], **metrics,
                   **{f"eval_{key}": value for key, value in evaluation.items()},
                   "seconds": time.time() - began, "train_seconds": trained - began}
        model.metrics = {"stage": stage, "epoch": epoch + 1, **metrics}
        if runtime.is_main:
            log.info("%s epoch %d/%d: loss %.4f, train acc %s, eval acc %s%s%s (%.0f s)",
                     name, epoch + 1, stage_config.epochs, metrics["loss"],
                     format_steps(metrics["train_accuracy"]), format_steps(evaluation["accuracy"]),
                     " (random locations)" if locations else "", _policy_line(metrics),
                     metrics["seconds"])
        recorder.write(epoch + 1, metrics)
        run.save(optimizers, epoch=epoch + 1, update=learner.updates if learner else 0,
                 finished=epoch + 1 == stage_config.epochs, metric=evaluation["accuracy"][-1],
                 scaler=scaler)
        history.append(metrics)
        if run.stop_requested():  # the signal came after the last batch: last.pt is exact
            raise run.interrupted()
    recorder.close()
    if learner is not None and learner.recorder is not None:
        learner.recorder.close()
    return history


@contextlib.contextmanager
def _policy_frozen(model):
    """The policy's parameters without requires_grad for the duration (then trainable again)."""
    model.policy.requires_grad_(False)
    try:
        yield
    finally:
        model.policy.requires_grad_(True)


def _policy_line(metrics: dict) -> str:
    """The one-stage recipe's policy statistics for the epoch's log line ('' otherwise)."""
    if "ppo_reward_focus" not in metrics:
        return ""
    rewards = "/".join(f"{v:.3f}" for v in metrics["ppo_reward_focus"])
    hit_rate = metrics.get("eval_hit_rate")
    hits = f", hit rate {'/'.join(f'{v:.3f}' for v in hit_rate)}" if hit_rate else ""
    return (f"{hits}; policy: reward {rewards}, approx KL {metrics['ppo_approx_kl']:.4f}, "
            f"explained variance {metrics['ppo_explained_variance']:.2f}, location spread "
            f"{metrics['ppo_location_spread']:.2f}, at edge {metrics['ppo_edge_share']:.0%}, "
            f"random share {metrics['random_fraction']:.2f}, focus share "
            f"{metrics['focus_fraction']:.2f}")


def _epoch_batches(run: StageRun, batch_size: int, epoch: int):
    """The epoch's training batches: the same ones, in the same order, at every call."""
    return make_loader(run.train_set, batch_size, run.runtime, seed=run.seed,
                       epoch=run.data_epoch(epoch), shuffle=True,
                       num_workers=run.config.data.num_workers)


def _bad_file_count(dataset) -> int:
    """Unreadable files met so far (image folders; 0 for datasets that cannot have any)."""
    return len(getattr(dataset, "bad_files", ()))
