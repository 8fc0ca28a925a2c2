"""Two processes under torchrun (gloo, CPU): PPO's returns and logged statistics over the whole
batch, augmentations per process, and a process whose whole batch is unreadable does not hang the
others.

One torchrun launch runs every check (this file is also its worker script); the test compares
what each process saved with the same computations done in one process.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

# stage 1 and stage 2 of the tiny run: 96 canvases, 16 per process and batch
TINY = ["data.canvas_size=48", "data.image_size=48", "model.patch_size=16", "data.num_clutter=2",
        "data.train_canvases=96", "data.test_canvases=32", "train.batch_size=32",
        "model.classifier_hidden=32", "model.policy_hidden=32", "data.num_workers=0",
        "train.stage1.epochs=1", "train.stage2.updates=2"]
GLOBAL_BATCH, FOCUS_STEPS, GAMMA = 12, 2, 0.7


def global_rollout():
    """The same rewards and critic values in every process: each takes its half of the batch."""
    generator = torch.Generator().manual_seed(7)
    return (torch.rand(FOCUS_STEPS, GLOBAL_BATCH, generator=generator),
            torch.rand(FOCUS_STEPS, GLOBAL_BATCH, generator=generator))


def global_statistics_rollout():
    """A rollout whose every statistic is known, the same in every process (each takes its half
    of the batch), with some mean locations at the image's edge."""
    from glancefocus.train.ppo import Rollout

    generator = torch.Generator().manual_seed(8)
    steps, batch = FOCUS_STEPS + 1, GLOBAL_BATCH
    means = torch.rand(FOCUS_STEPS, batch, 2, generator=generator)
    means[:, ::3, 0] = 0.005
    return Rollout(states=torch.zeros(FOCUS_STEPS, batch, 1, 1, 1),
                   actions=torch.zeros(FOCUS_STEPS, batch, 2),
                   log_probs=torch.zeros(FOCUS_STEPS, batch),
                   values=torch.rand(FOCUS_STEPS, batch, generator=generator),
                   true_probs=torch.rand(steps, batch, generator=generator),
                   correct=torch.rand(steps, batch, generator=generator) > 0.5, means=means)


def rollout_half(rollout, rank):
    import dataclasses

    half = GLOBAL_BATCH // 2
    return type(rollout)(*(getattr(rollout, f.name)[:, rank * half:(rank + 1) * half]
                           for f in dataclasses.fields(rollout)))


def data_config(root):
    from glancefocus.config import DataConfig

    return DataConfig(root=str(root), image_size=16, resize_size=16, num_workers=0)


class UnreadableFirstBatch(torch.utils.data.Dataset):
    """Cluttered MNIST where process 1's first batch of stage 1 and of stage 2 is unreadable
    (items None, as an image folder gives for files it cannot read)."""

    def __init__(self, base, batch):
        from torch.utils.data import DistributedSampler

        from glancefocus.train.context import DATA_EPOCHS_PER_STAGE

        self.base, self.bad = base, set()
        for stage in (1, 2):
            sampler = DistributedSampler(range(len(base)), num_replicas=2, rank=1, shuffle=True, seed=0)
            sampler.set_epoch(stage * DATA_EPOCHS_PER_STAGE)
            self.bad |= set(list(sampler)[:batch])

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return None if index in self.bad else self.base[index]


# ----------------------------------------------------------------------------------------------
# the worker: run by torchrun, one per process

def worker(out: Path, images: Path) -> None:
    import logging

    from glancefocus.config import load_config
    from glancefocus.data import ClutteredMNIST, ImageFolderDataset
    from glancefocus.presets import get_preset
    from glancefocus.train import train
    from glancefocus.train.loaders import make_loader
    from glancefocus.train.ppo import _update_statistics, discounted_returns, normalise
    from glancefocus.train.runtime import start_runtime

    logging.basicConfig(level=logging.INFO)  # the stages say when the weights agree
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))  # for the test's timeout
    runtime = start_runtime("cpu")
    rank, half = runtime.rank, GLOBAL_BATCH // 2
    result = {}
    # (a) returns normalised over both processes' batches
    rewards, values = (t[:, rank * half:(rank + 1) * half] for t in global_rollout())
    returns = normalise(discounted_returns(rewards, GAMMA), runtime=runtime)
    result["returns"], result["advantages"] = returns, returns - values
    # a stand-in batch (here NaN) is left out of the statistics: process 0 normalises alone
    garbage = torch.full_like(rewards, float("nan"))
    result["alone"] = normalise(discounted_returns(rewards, GAMMA) if rank == 0 else garbage,
                                runtime=runtime, included=rank == 0)
    # the logged PPO statistics (rewards, accuracy, explained variance, locations) of the whole batch
    rollout = rollout_half(global_statistics_rollout(), rank)
    result["statistics"] = _update_statistics({"approx_kl": torch.tensor(0.01)}, rollout,
                                              rollout.rewards, runtime, included=True)
    # (b) each process's augmentations, and its own global random stream
    dataset = ImageFolderDataset(images, "train", data_config(images), train=True)
    loader = make_loader(dataset, 4, runtime, seed=0, epoch=0, shuffle=True, num_workers=0)
    result["indices"] = list(loader.sampler)
    result["images"] = torch.cat([batch[0] for batch in loader])
    runtime.seed_process(0, 11, 1, 0)
    result["dropout_draw"] = torch.rand(4)
    torch.save(result, out / f"rank{rank}.pt")
    # (c) process 1's first batch of each stage is unreadable: the run must finish
    config = load_config(None, TINY + [f"train.out_dir={out / 'run'}"], base=get_preset("demo"))
    base = ClutteredMNIST(config.data, "train")
    datasets = (UnreadableFirstBatch(base, 16), ClutteredMNIST(config.data, "test"),
                [str(d) for d in range(10)])
    history = train(config, stages=[1, 2], datasets=datasets, progress=False)
    torch.save({"stage2": history[2]}, out / f"history{rank}.pt")


# ----------------------------------------------------------------------------------------------
# the test

def write_images(root):
    generator = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 255, (32, 40, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def run_to_end(command, env, timeout, out: Path):
    """(exit status, output); past `timeout` the launcher and its workers are killed (torchrun
    starts each worker in its own session: they name themselves in out/pid*)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for path in out.glob("pid*"):
            try:
                os.kill(int(path.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.kill()
        output, _ = process.communicate()
        return None, f"no end after {timeout} s (a process waiting in a collective?):\n{output}"
    return process.returncode, output


def test_two_processes(tmp_path):
    from glancefocus.data import ImageFolderDataset
    from glancefocus.train.loaders import make_loader
    from glancefocus.train.ppo import _update_statistics, discounted_returns, normalise
    from glancefocus.train.runtime import Runtime

    images = write_images(tmp_path / "images")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(tmp_path), str(images)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    # a hang (a process left alone in a collective) fails here instead of blocking the suite
    code, output = run_to_end(command, env, timeout=150, out=tmp_path)
    assert code == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    # (a) the same normalised returns and advantages as one process on the whole batch
    rewards, values = global_rollout()
    returns = normalise(discounted_returns(rewards, GAMMA))
    together = torch.cat([r["returns"] for r in ranks], dim=1)
    assert torch.allclose(together, returns, atol=1e-6)
    assert torch.allclose(torch.cat([r["advantages"] for r in ranks], dim=1), returns - values, atol=1e-6)
    alone = normalise(discounted_returns(rewards[:, :GLOBAL_BATCH // 2], GAMMA))
    assert torch.allclose(ranks[0]["alone"], alone, atol=1e-6)
    whole = global_statistics_rollout()
    single = _update_statistics({"approx_kl": torch.tensor(0.01)}, whole, whole.rewards,
                                Runtime(torch.device("cpu")), True)
    assert single["edge_share"] > 0
    for rank in ranks:
        assert rank["statistics"].keys() == single.keys()
        for key, value in single.items():
            assert torch.allclose(torch.tensor(rank["statistics"][key], dtype=torch.float64),
                                  torch.tensor(value, dtype=torch.float64), atol=1e-6), key

    # (b) the processes read different images, and the crop of an image is the one a single
    # process draws for it (a function of seed, epoch and index only)
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])
    assert not torch.equal(ranks[0]["images"], ranks[1]["images"])
    assert not torch.equal(ranks[0]["dropout_draw"], ranks[1]["dropout_draw"])
    dataset = ImageFolderDataset(images, "train", data_config(images), train=True)
    single = make_loader(dataset, 8, Runtime(torch.device("cpu")), seed=0, epoch=0, shuffle=True)
    by_index = dict(zip(list(single.sampler), next(iter(single))[0]))
    for rank in ranks:
        for index, image in zip(rank["indices"], rank["images"]):
            assert torch.equal(image, by_index[index])

    # (c) the run finished (no hang), every stage checked that the weights agree, and the
    # update where process 1 had nothing still has statistics from process 0's batch
    assert output.count("the 2 processes hold identical weights") == 2, output[-3000:]
    history = torch.load(tmp_path / "history0.pt")["stage2"]
    assert len(history) == 2 and all(stats["reward_focus"] for stats in history)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
