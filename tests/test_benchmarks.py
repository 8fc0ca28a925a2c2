"""Smoke tests of benchmarks/train_step.py, benchmarks/memory.py, benchmarks/onnx_parity.py and
benchmarks/recipes.py on the tiny demo preset, and of the channels-last crop.
Timings are only produced here, never asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory
import train_step
from engine_parity import allowed_near_ties

from glancefocus import create_model, crops

TINY = ("data.image_size=48",)


def test_train_step_times_both_stages_and_writes_json(tmp_path):
    out = tmp_path / "step.json"
    result = train_step.main(["--preset", "demo", "--batch", "2", "--steps", "2", "--warmup", "0",
                              "--threads", "1", "--json", str(out), *TINY])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for stage in (1, 2):
        assert written[f"stage{stage}_seconds"] > 0
        assert len(written[f"stage{stage}_all_seconds"]) == 2
    assert {"preset", "batch", "amp", "channels_last", "device", "threads", "torch"} <= set(written)
    assert (written["preset"], written["batch"], written["image_size"]) == ("demo", 2, 48)


def test_train_step_trains_what_its_stage_trains():
    config, runtime, model, images, labels = train_step.build_setup("demo", 2, overrides=TINY)
    policy_before = [p.detach().clone() for p in model.policy.parameters()]
    encoder_before = [p.detach().clone() for p in model.focus_encoder.parameters()]
    train_step.stage1_step(config, runtime, model, images, labels)()
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.focus_encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(policy_before, model.policy.parameters()))
    encoder_after = [p.detach().clone() for p in model.focus_encoder.parameters()]
    train_step.stage2_step(config, runtime, model, images, labels)()
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, model.policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(encoder_after, model.focus_encoder.parameters()))


def test_memory_rows_grow_with_the_micro_batch_and_shrink_with_checkpointing(tmp_path):
    out = tmp_path / "memory.json"
    result = memory.main(["--preset", "demo", "--batch", "8", "--micro-batches", "8,2",
                          "--amp", "none,bf16", "--no-cuda", "--json", str(out), *TINY])
    rows = json.loads(out.read_text())["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    by = {(r["stage"], r["micro_batch"], r["amp"], r["activation_checkpointing"]): r for r in rows}
    full, micro = by[("1/3", 8, "none", False)], by[("1/3", 2, "none", False)]
    assert full["authors_setting"] and not micro["authors_setting"]
    assert sum(r["authors_setting"] for r in rows) == 1
    assert full["activations_bytes"] > micro["activations_bytes"] > 0
    assert full["estimated_bytes"] > micro["estimated_bytes"]
    checkpointed = by[("1/3", 8, "none", True)]
    assert checkpointed["activations_bytes"] < full["activations_bytes"]
    assert checkpointed["recompute_peak_bytes"] > 0 and full["recompute_peak_bytes"] == 0
    model = create_model("demo", pretrained=False)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert full["parameters_bytes"] == params
    assert full["optimizer_bytes"] == full["gradients_bytes"] < params  # the policy is frozen
    policy = sum(p.numel() * 4 for p in model.policy.parameters())
    stage2 = by[("2", 8, "none", False)]
    assert stage2["gradients_bytes"] == policy and stage2["optimizer_bytes"] == 2 * policy
    # stage 2's rollout also holds both encoders with BatchNorm folded: each BatchNorm's weight
    # and bias (2 numbers a channel) become its convolution's bias (1 a channel)
    encoder = sum(p.numel() * 4 for p in model.glance_encoder.parameters())
    channels = sum(m.num_features for m in model.glance_encoder.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    assert stage2["parameters_bytes"] == params + 2 * (encoder - 4 * channels)
    for row in rows:
        parts = [v for k, v in row.items() if k.endswith("_bytes") and k != "estimated_bytes"]
        assert row["estimated_bytes"] == sum(parts)


def test_saved_tensor_counter_counts_a_shared_storage_once():
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    counter = memory.SavedTensorCounter(excluded=[weight])
    with counter.hooks():
        y = (x @ weight).relu()       # saves x (and the weight: excluded) and relu's output
        z = (y[:, :2] * y[:, 2:]).sum()  # saves two views of y's storage
    z.backward()
    assert counter.total == x.numel() * 4 + y.numel() * 4


def test_channels_last_crop_keeps_the_layout_and_the_pixels():
    images = torch.randn(3, 3, 20, 30).contiguous(memory_format=torch.channels_last)
    locations = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 0.0]])
    patches = crops.crop(images, locations, 8)
    assert patches.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(patches, crops.crop(images.contiguous(), locations, 8))


def test_recipes_benchmark_trains_both_and_checks_the_goals(tmp_path):
    import recipes

    out = tmp_path / "recipes.json"
    tiny = ["data.canvas_size=48", "data.image_size=48", "model.patch_size=16",
            "data.num_clutter=2", "data.train_canvases=64", "data.test_canvases=32",
            "train.batch_size=32", "model.classifier_hidden=32", "model.policy_hidden=32",
            "train.stage1.epochs=1", "train.stage2.updates=2", "train.stage3.epochs=1",
            "train.one_stage.epochs=1"]
    result = recipes.main([*tiny, "--threads", "1", "--out", str(tmp_path / "runs"),
                           "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for recipe in ("three_stage", "one_stage"):
        row = written[recipe]
        assert row["seconds"] > 0
        split = [row[f"seconds_{part}"] for part in ("training_passes", "end_of_epoch", "other")]
        assert all(part > 0 for part in split) and sum(split) == pytest.approx(row["seconds"])
        assert len(row["anytime_accuracy"]) == len(row["anytime_macs"]) == 3
        assert len(row["random_policy_accuracy"]) == 3 and len(row["hit_rate"]) == 2
    assert written["three_stage"]["anytime_macs"] == written["one_stage"]["anytime_macs"]
    goals = written["goals"]
    assert goals["time_ratio"] == written["one_stage"]["seconds"] / written["three_stage"]["seconds"]
    assert isinstance(goals["accuracy_holds"], bool) and isinstance(goals["time_holds"], bool)


def test_recipes_benchmark_averages_seeds():
    import recipes

    runs = [{"seconds": 10.0, "anytime_accuracy": [90.0, 96.0], "hit_rate": [0.5]},
            {"seconds": 20.0, "anytime_accuracy": [92.0, 96.0], "hit_rate": [0.7]}]
    summary = recipes.mean_over_seeds(runs, [0, 1])
    assert summary["seconds"] == 15.0
    assert summary["anytime_accuracy"] == [91.0, 96.0]
    assert summary["hit_rate"] == [0.6]
    assert summary["anytime_accuracy_std"][0] == pytest.approx(2 ** 0.5)
    assert summary["anytime_accuracy_std"][1] == 0.0
    assert summary["seeds"] == [0, 1] and summary["runs"] == runs


def test_recipes_benchmark_refuses_bad_seeds(capsys):
    import recipes

    for bad in ("0,x", "1,1"):
        with pytest.raises(SystemExit):
            recipes.main(["--seeds", bad])
        assert "--seeds" in capsys.readouterr().err


def test_onnx_parity_compares_logits_boxes_and_exits_at_five_budgets():
    pytest.importorskip("onnxruntime")
    import onnx_parity

    torch.manual_seed(0)
    model = create_model("demo", patch_size=16).eval()
    images, calibration = torch.randn(12, 1, 48, 48), torch.randn(16, 1, 48, 48)
    report = onnx_parity.parity(model, images, calibration, "tiny demo", batch_size=5)
    assert report["images"] == 12 and len(report["logits_max_abs_difference_per_step"]) == 3
    assert max(report["logits_max_abs_difference_per_step"]) <= onnx_parity.LOGIT_TOLERANCE
    # a box can move by a pixel where a location sits within rounding of a pixel boundary
    # (engine_parity): rare, so at most one image of the twelve
    assert report["boxes_identical"] == (report["boxes_differing_images"] == 0)
    assert report["boxes_differing_images"] <= allowed_near_ties(12)
    assert [b["budget_q"] for b in report["budgets"]] == list(onnx_parity.BUDGET_RATIOS)
    for budget in report["budgets"]:
        assert budget["identical"] == (budget["differing_images"] == 0)
        assert abs(sum(budget["exit_share"]) - 1) < 1e-9


def test_gpu_check_smoke_runs_every_check_on_the_cpu(tmp_path, monkeypatch):
    import gpu_check

    # the smoke sizes its smaller card for float32; a CPU with native bf16 would take bf16
    monkeypatch.setattr("glancefocus.train.runtime.native_bf16", lambda device: False)

    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["memory"]["rows"]
    assert {r["stage"] for r in rows} == {"1/3", "2", "one-stage"}
    assert all(r["estimated_bytes"] > 0 and r["seconds"] > 0 and "error" not in r for r in rows)
    small, large = sorted(result["fit"], key=lambda r: r["card_gb"])
    assert small["ran_3_steps"] and large["ran_3_steps"]
    assert small["micro_batch"] < large["micro_batch"] or small["activation_checkpointing"]
    assert small["estimated_bytes"] <= small["limit_bytes"]
    assert [b["q"] for b in result["early_exit"]["budgets"]] == [0.25, 0.5, 1.0]
    assert result["onnx_cuda"]["last_step_logits_max_abs_difference"] < 1e-4
