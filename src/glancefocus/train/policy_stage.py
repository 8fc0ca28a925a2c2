"""Stage 2: train the patch policy with PPO, one update per batch.

Encoders and classifier are frozen in eval mode. Every update is logged (RUN/stage2/metrics.csv:
reward per focus step (reward_focus_1 is the first focus, the glance has none), approx KL and clip
fraction of the updated policy against the collecting one, explained variance, entropy, value and
policy loss (approx KL and clip fraction every train.stage2.kl_every updates, as they cost a
pass of the policy), accuracy per step with the sampled locations (accuracy_1 is the glance), the spread
of the policy's mean locations across images and their share at the image's edge, all over
every process's batch); the policy is evaluated with its mean
locations at the end of each epoch (RUN/stage2/eval.csv). last.pt is written every
`save_every` updates and at each epoch end, so a resumed run restarts mid-epoch exactly.
"""
from __future__ import annotations

import logging
import math

import torch
from tqdm import tqdm

from .context import StageRun
from .diagnosis import WARN_EVERY, explain_locations, explain_rewards
from .evaluation import evaluate_anytime
from .fit import confirm_on_cuda
from .loaders import (
    StandIn,
    batches_per_epoch,
    check_bad_files,
    make_loader,
    per_process_batch,
    unpack,
)
from .optim import freeze_for_stage, set_train_modes
from .ppo import PPOLoss, collect_rollout, policy_optimizer, ppo_update
from .runtime import STREAM_GLOBAL, STREAM_PPO
from .supervised import format_steps

log = logging.getLogger("glancefocus.train")

def run_policy_stage(run: StageRun) -> list[dict]:
    model, runtime, config = run.model, run.runtime, run.config
    stage_config = run.stage_config
    if model.config.max_steps < 2:
        raise ValueError("stage 2 trains the patch policy, which needs model.max_steps >= 2")
    freeze_for_stage(model, 2, stage_config)
    optimizer = policy_optimizer(model.policy, stage_config.ppo_lr)
    ppo_loss = runtime.wrap(PPOLoss(model.policy, stage_config.ppo_clip, stage_config.value_coef,
                                    stage_config.entropy_coef, stage_config.policy_logit_limit))
    batch_size = per_process_batch(config.train.batch_size, runtime)
    per_epoch = batches_per_epoch(len(run.train_set), batch_size, runtime)
    total = stage_config.updates or stage_config.epochs * per_epoch
    update = run.restore(optimizer)["update"] if run.resume else 0
    recorder = run.recorder("update")
    eval_recorder = run.recorder("update", file_name="eval.csv")
    bar = tqdm(total=total, initial=update, desc="stage 2 PPO updates",
               disable=not (run.progress and runtime.is_main), dynamic_ncols=True)
    history, last_warning = [], -math.inf
    if update >= total and runtime.is_main:
        log.info("stage 2: all %d updates were done already", total)
    while update < total:
        epoch, position = divmod(update, per_epoch)
        loader = make_loader(run.train_set, batch_size, runtime, seed=run.seed,
                             epoch=run.data_epoch(epoch), shuffle=True,
                             num_workers=config.data.num_workers, skip_batches=position)
        stand_in = StandIn(loader.dataset)
        for batch in loader:
            # everything random in an update follows from (seed, update, rank): resume is exact
            runtime.seed_process(run.seed, STREAM_GLOBAL, 2, update)
            set_train_modes(model, 2, stage_config)
            stats = {}
            weight = 1.0
            if batch is None and runtime.distributed:
                # every file of this process's batch was unreadable: the others need it in the
                # update's collectives, with nothing of its own to add
                batch, weight = stand_in.get(), 0.0
            if batch is not None:  # None: every file of the batch was unreadable
                images, labels, _ = unpack(batch, runtime, config.train.channels_last)
                rollout = _collect(run, images, labels, update)
                stats = ppo_update(ppo_loss, optimizer, rollout, stage_config, runtime, run.guard,
                                   where=f"stage 2 update {update + 1}", weight=weight,
                                   movement=update % max(stage_config.kl_every, 1) == 0)
                warning = (explain_rewards(rollout, model.config.num_classes)
                           or explain_locations(stats, rollout, "stage2",
                                                stage_config.policy_logit_limit)
                           if weight else None)
                if warning and runtime.is_main and update - last_warning >= WARN_EVERY:
                    log.warning("update %d: %s", update + 1, warning)
                    last_warning = update
            update += 1
            recorder.write(update, stats)
            history.append(stats)
            if stats and not bar.disable:
                bar.set_postfix_str(f"reward {format_rewards(stats['reward_focus'])} "
                                    f"acc {format_steps(stats['accuracy'])}")
            bar.update(1)
            stop = run.stop_poll()
            if update % per_epoch == 0 or update == total:
                check_bad_files(run.train_set)
                _evaluate_and_save(run, optimizer, update, total, update // per_epoch, eval_recorder)
            elif update % run.save_every == 0 or stop:
                # a stop signal saves here too: resume restarts mid-epoch exactly at `update`
                run.save(optimizer, epoch=update // per_epoch, update=update, finished=False)
            if stop:
                bar.close()
                raise run.interrupted()
            if update >= total:
                break
    bar.close()
    recorder.close()
    eval_recorder.close()
    return history


def _collect(run: StageRun, images, labels, update: int):
    """The update's rollout, micro-batch by micro-batch; out of GPU memory, again with half the
    micro-batch (the same random locations: the generator starts afresh)."""
    while True:
        try:
            rollout = collect_rollout(run.model, images, labels, run.runtime,
                                      run.runtime.generator(run.seed, STREAM_PPO, update),
                                      run.micro.size)
            break
        except torch.cuda.OutOfMemoryError:
            if run.runtime.distributed:
                raise
            run.micro.halve(images.shape[0], f"stage 2 update {update + 1}")
    if run.fit is not None and update == 0:
        confirm_on_cuda(run.runtime.device, run.fit, "stage 2 rollout 1")
    return rollout


def _evaluate_and_save(run: StageRun, optimizer, update: int, total: int, epoch: int,
                       recorder) -> None:
    model, config = run.model, run.config
    batch_size = per_process_batch(config.train.batch_size, run.runtime)
    evaluation = evaluate_anytime(model, run.eval_set, run.runtime, batch_size, seed=run.seed,
                                  num_workers=config.data.num_workers)
    metrics = {f"eval_{key}": value for key, value in evaluation.items()}
    model.metrics = {"stage": 2, "update": update, **metrics}
    if run.runtime.is_main:
        hit_rate = evaluation.get("hit_rate")
        log.info("stage 2 update %d/%d: eval acc %s%s", update, total,
                 format_steps(evaluation["accuracy"]),
                 f", hit rate {format_rewards(hit_rate)}" if hit_rate else "")
    recorder.write(update, metrics)
    run.save(optimizer, epoch=epoch, update=update, finished=update == total,
             metric=evaluation["accuracy"][-1])


def format_rewards(values) -> str:
    return "/".join(f"{float(v):.3f}" for v in values)
