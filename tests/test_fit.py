"""Fitting a run to its device (train.amp=auto, train.micro_batch=auto), the out-of-memory retry
and `glancefocus memory` (CPU, offline; the resnet50 counts run on fake tensors)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from glancefocus.cli import main
from glancefocus.config import load_config
from glancefocus.presets import get_preset
from glancefocus.train.faults import MicroBatchSize, NonFiniteGuard
from glancefocus.train.fit import HEADROOM, choose_micro_batch, fit_to_device, parse_bytes
from glancefocus.train.memory import MemoryCounter
from glancefocus.train.runtime import resolve_amp, start_runtime
from glancefocus.train.supervised import train_epoch

GB = 1e9


@pytest.fixture
def float32_cpu(monkeypatch):
    """A CPU without native bf16 (train.amp=auto means float32 there): the machine running the
    tests may have AVX512-BF16 or AMX, which would make 'auto' pick bf16."""
    monkeypatch.setattr("glancefocus.train.runtime.native_bf16", lambda device: False)


def resnet50(*overrides):
    return load_config(None, ["model.pretrained=false", "model.num_classes=1000", *overrides],
                       base=get_preset("resnet50"))


@pytest.mark.parametrize("budget, micro", [(8, 64), (15, 128), (80, 256)])
def test_resnet50_takes_the_largest_micro_batch_that_fits(budget, micro, float32_cpu):
    config, choice = fit_to_device(resnet50(f"train.memory_budget={budget}GB"), "cpu")
    assert choice.budget == budget * GB and choice.fits
    assert (config.train.micro_batch, config.train.amp) == (micro, "none")
    assert not config.train.activation_checkpointing and config.train.batch_size == 256
    assert choice.largest_estimate <= HEADROOM * budget * GB
    if micro < 256:  # the next larger one does not fit: the largest, not the smallest
        larger = MemoryCounter(config).estimate("1/3", 256, 2 * micro, "none", False)
        assert larger["estimated_bytes"] > HEADROOM * budget * GB


def test_a_t4_runs_the_whole_batch_in_fp16_and_checkpoints_only_when_nothing_else_fits():
    counter = MemoryCounter(resnet50())
    micro, ckpt, estimate, fits = choose_micro_batch(counter, ["1/3", "2"], 256, "fp16", 15 * GB,
                                                     "auto", False)
    assert (micro, ckpt, fits) == (256, False, True) and estimate["1/3"] <= 12 * GB
    # 1.4 GB: not even one image fits without checkpointing
    one_image = counter.estimate("1/3", 256, 1, "none", False)["estimated_bytes"]
    assert one_image > HEADROOM * 1.4 * GB
    micro, ckpt, estimate, fits = choose_micro_batch(counter, ["1/3"], 256, "none", 1.4 * GB,
                                                     "auto", False)
    assert ckpt and fits and estimate["1/3"] <= HEADROOM * 1.4 * GB
    assert counter.estimate("1/3", 256, 2 * micro, "none", True)["estimated_bytes"] > 1.12 * GB


def test_amp_follows_the_device(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # a T4 / V100: bf16 only by emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", cuda)[0] == "fp16"
    mode, _, warning = resolve_amp("bf16", cuda)
    assert mode == "bf16" and "emulated" in warning and "train.amp=fp16" in warning
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", cuda) == ("bf16", "native bf16", None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_amp("auto", cpu)[0] == "none"
    assert "train.amp=none" in resolve_amp("bf16", cpu)[2]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_amp("auto", cpu)[0] == "bf16" and resolve_amp("bf16", cpu)[2] is None


def test_memory_budget_sizes():
    assert parse_bytes("15GB") == 15 * 10**9 and parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("800 MB") == 800 * 10**6 and parse_bytes(1000) == 1000
    for bad in ("fifteen", "15XB", "0GB"):
        with pytest.raises(ValueError, match="train.memory_budget"):
            parse_bytes(bad)


def test_native_bf16_takes_bf16_and_a_micro_batch_at_least_as_large(monkeypatch):
    monkeypatch.setattr("glancefocus.train.runtime.native_bf16", lambda device: True)
    config, choice = fit_to_device(resnet50("train.memory_budget=8GB"), "cpu")
    assert config.train.amp == "bf16" and choice.fits and config.train.micro_batch >= 64
    assert choice.largest_estimate <= HEADROOM * 8 * GB


def test_print_config_shows_the_resolved_values(capsys, float32_cpu):
    status = main(["train", "--preset", "resnet50", "train.memory_budget=15GB",
                   "model.pretrained=false", "--print-config"])
    out = capsys.readouterr().out
    assert status == 0 and "micro_batch: auto" not in out and "amp: auto" not in out
    assert "  micro_batch: 128\n" in out and "  amp: none\n" in out
    assert "micro-batch 128 of 256" in out and "stage 1/3: 11.21 GB" in out


class _Linear(nn.Module):
    """A loss whose forward raises CUDA's out-of-memory error at chosen calls (before it
    computes anything), as a real forward pass over too large a micro-batch would."""

    def __init__(self, fail_at):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.fail_at, self.calls = set(fail_at), 0

    def forward(self, images, labels, generator=None):
        self.calls += 1
        if self.calls in self.fail_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        logits = self.layer(images)
        return nn.functional.cross_entropy(logits, labels), logits.detach()[None]


def _train(fail_at):
    torch.manual_seed(0)
    loss = _Linear(fail_at)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=generator), torch.randint(3, (8,), generator=generator))
               for _ in range(200)]
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    micro = MicroBatchSize(8)
    metrics = train_epoch(loss, loss, batches, optimizer, start_runtime("cpu", "none"),
                          NonFiniteGuard(0), steps=1, micro_batch=micro, progress=False)
    return loss, metrics, micro, len(steps)


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step(caplog):
    plain, plain_metrics, _, plain_steps = _train(())
    # the 11th, 60th and 150th forward passes run out of memory
    loss, metrics, micro, steps = _train((11, 60, 150))
    assert steps == plain_steps == 200  # no step lost
    assert micro.size == 1 and micro.retries == metrics["oom_retries"] == 3
    assert "redoing the step with 4" in caplog.text
    # the same effective batch: the same weights, up to the order of the sums
    for a, b in zip(loss.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-5)


def test_memory_command_json_marks_what_fits(capsys):
    argv = ["memory", "--preset", "demo", "--micro-batches", "128,32", "--amp", "none,bf16",
            "--json", "--budget", "0.1GB"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert {r["stage"] for r in rows} == {"1/3", "2", "one-stage"}
    assert len(rows) == 2 * 2 * 2 * 2 + 2  # 1/3 and one-stage: micro x amp x ckpt; stage 2: micro
    by = {(r["stage"], r["micro_batch"], r["amp"], r["activation_checkpointing"]): r for r in rows}
    assert by[("1/3", 32, "none", False)]["fits"] and not by[("1/3", 128, "none", False)]["fits"]
    for row in rows:
        assert row["fits"] == (row["estimated_bytes"] <= HEADROOM * 0.1 * GB)
    assert by[("one-stage", 32, "none", False)]["rollout_bytes"] > 0
    assert result["settings"]["budget_bytes"] == 10**8
