"""The checks that need a GPU, in one command (one CUDA GPU, under 8 minutes); prints JSON.

    python benchmarks/gpu_check.py [--json FILE] [--time-limit 450]
    python benchmarks/gpu_check.py --smoke      # tiny sizes, on the CPU: the tests run this

1. memory: for the resnet50 preset (effective batch 256, 224 px, 1000 classes, random weights)
   and each kind of step (stages 1/3, stage 2, the one-stage recipe), micro-batch (256, 128, 64),
   AMP mode (fp32, bf16, fp16) and activation checkpointing (stage 2: per micro-batch only): the
   estimate of glancefocus.train.memory (counted on this GPU) against the measured peak
   (torch.cuda.max_memory_allocated of the last of the timed steps, the optimiser state made by
   the warm-up step), and the median step time. `ratio` = measured / estimated; the goal is
   within 15 %. max_memory_allocated counts what PyTorch's allocator hands out (cuDNN's
   workspaces included); it leaves out the CUDA context (a fixed few hundred MB per process,
   reported as `cuda_context_bytes` from torch.cuda.mem_get_info before and after the first
   allocation) and the allocator's cached, unused blocks.
2. fit: the automatic choice (train.amp=auto, train.micro_batch=auto) under
   torch.cuda.set_per_process_memory_fraction set to simulate 15 GB and 8 GB cards, then 3 real
   stage-1 steps with it: whether they ran without running out of memory (a halving counts as
   a retry) and their peak.
3. early_exit: images per second of every step for every image against real early exit
   (glancefocus.predictor.Predictor) at q = 0.25, 0.5 and 1.0 (thresholds calibrated on other
   images), with the MACs per image: the time saving against the MACs saving on a GPU.
4. onnx_cuda: onnxruntime's CUDA execution provider against PyTorch on CUDA, every step of the
   exported graphs on a batch (when onnxruntime has the CUDA provider; else the reason).

--smoke runs the same code at tiny sizes (the demo preset at 48 px, batch 8, float32 only, one
timed step) on the CPU, where no peak is measured (measured_bytes null) and onnxruntime's CPU
provider stands in for the CUDA one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from glancefocus import exits  # noqa: E402
from glancefocus.config import load_config  # noqa: E402
from glancefocus.presets import assumed_num_classes, get_preset  # noqa: E402
from glancefocus.train.fit import HEADROOM, fit_to_device  # noqa: E402
from glancefocus.train.memory import KINDS, MemoryCounter  # noqa: E402
from glancefocus.train.memory_command import training_step  # noqa: E402

GB = 1e9
FULL = {"preset": "resnet50", "overrides": ["model.num_classes=1000"], "batch": 256,
        "micro_batches": (256, 128, 64), "amps": ("none", "bf16", "fp16"), "timed": 3,
        "cards_gb": (15, 8), "exit_images": 512, "exit_batch": 64, "rounds": 3}
SMOKE = {"preset": "demo", "overrides": ["data.canvas_size=48", "data.image_size=48",
                                         "model.patch_size=16", "model.classifier_hidden=16",
                                         "model.policy_hidden=16"],
         "batch": 8, "micro_batches": (8,), "amps": ("none",), "timed": 1,
         "cards_gb": (0.05, 0.008), "exit_images": 16, "exit_batch": 8, "rounds": 1}


def config_for(sizes: dict, *overrides):
    config = load_config(None, ["model.pretrained=false", f"train.batch_size={sizes['batch']}",
                                *sizes["overrides"], *overrides], base=get_preset(sizes["preset"]))
    if config.model.num_classes is None:  # training reads it from the data
        config.model.num_classes = assumed_num_classes(config)
    return config


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, device, timed: int = 3) -> dict:
    """One warm-up step (it makes the optimiser state), then `timed` steps: their median
    seconds and (CUDA) the peak of the timed ones."""
    step()
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(timed):
        began = time.perf_counter()
        step()
        synchronise(device)
        seconds.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": statistics.median(seconds), "measured_bytes": peak}


# ----------------------------------------------------------------------------------------------
# 1. memory: the estimate against the measured peak

def memory_check(sizes: dict, device, deadline: float) -> dict:
    config = config_for(sizes)
    counter = MemoryCounter(config, device)  # a real count on a GPU, fake tensors on a CPU
    amps = sizes["amps"]
    rows, skipped = [], 0
    for kind in KINDS:
        variants = ([("none", False)] if kind == "2" else
                    [(amp, ckpt) for amp in amps for ckpt in (False, True)])
        for amp, ckpt in variants:
            for micro in sizes["micro_batches"]:
                if time.time() > deadline:
                    skipped += 1
                    continue
                estimate = counter.estimate(kind, sizes["batch"], micro, amp, ckpt)
                row = {"stage": kind, "micro_batch": micro, "amp": amp,
                       "activation_checkpointing": ckpt,
                       "estimated_bytes": estimate["estimated_bytes"]}
                try:
                    row.update(run_steps(training_step(config, kind, micro, amp, ckpt, device),
                                         device, sizes["timed"]))
                except torch.cuda.OutOfMemoryError as exc:
                    row["error"] = f"out of memory: {str(exc)[:200]}"
                if row.get("measured_bytes"):
                    row["ratio"] = round(row["measured_bytes"] / row["estimated_bytes"], 3)
                    row["within_15_percent"] = abs(row["ratio"] - 1) <= 0.15
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    return {"rows": rows, "skipped_for_time": skipped,
            "ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "all_within_15_percent": all(r.get("within_15_percent") for r in rows) if ratios
            else None}


def cuda_context_bytes(device) -> int | None:
    """What the CUDA context and the libraries' handles take, outside PyTorch's allocator: the
    device's used memory minus what the allocator has reserved."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free - torch.cuda.memory_reserved(device))


# ----------------------------------------------------------------------------------------------
# 2. the automatic choice on a smaller card

def fit_check(sizes: dict, device, deadline: float) -> list[dict]:
    from glancefocus.train.faults import MicroBatchSize

    results = []
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else None)
    for card in sizes["cards_gb"]:
        if time.time() > deadline:
            results.append({"card_gb": card, "skipped": "time limit"})
            continue
        config = config_for(sizes, f"train.memory_budget={card}GB")
        config, choice = fit_to_device(config, device)
        train = config.train
        result = {"card_gb": card, "amp": train.amp, "micro_batch": train.micro_batch,
                  "activation_checkpointing": train.activation_checkpointing,
                  "estimated_bytes": choice.largest_estimate, "fits": choice.fits,
                  "limit_bytes": int(HEADROOM * choice.budget)}
        if total is not None:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, card * GB / total), device)
        micro = MicroBatchSize(train.micro_batch)
        try:
            step = training_step(config, "1/3", micro, train.amp,
                                 train.activation_checkpointing, device)
            measured = run_steps(step, device, timed=2)  # 3 real steps in all
            result.update(ran_3_steps=True, oom_retries=micro.retries,
                          micro_batch_after=micro.size, **measured)
        except torch.cuda.OutOfMemoryError as exc:
            result.update(ran_3_steps=False, error=str(exc)[:300])
        finally:
            if total is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                torch.cuda.empty_cache()
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------
# 3. early exit on this device

def early_exit_check(sizes: dict, device, deadline: float) -> dict:
    from glancefocus.model import GlanceFocusNet
    from glancefocus.predictor import Predictor

    if time.time() > deadline:
        return {"skipped": "time limit"}
    config = config_for(sizes)
    torch.manual_seed(0)
    model = GlanceFocusNet(config.model).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    size, count, batch = config.data.image_size, sizes["exit_images"], sizes["exit_batch"]
    # smooth random structure plus noise, so that images differ in more than noise
    coarse = torch.nn.functional.interpolate(
        torch.rand(2 * count, config.model.in_chans, 7, 7, generator=generator), size=size,
        mode="bilinear", align_corners=False)
    images = (coarse * 4 - 2 + 0.3 * torch.randn(coarse.shape, generator=generator)).to(device)
    calibration, images = images[:count], images[count:]
    with torch.inference_mode():
        logits = torch.cat([model(c).logits.float().cpu() for c in calibration.split(batch)], 1)
    thresholds = exits.calibrate_budgets(exits.confidences_from_logits(logits)[0])
    step_macs = model.macs()["per_step"]

    def timed(run) -> float:
        run()
        synchronise(device)
        rounds = []
        for _ in range(sizes["rounds"]):
            began = time.perf_counter()
            run()
            synchronise(device)
            rounds.append(time.perf_counter() - began)
        return count / statistics.median(rounds)

    with torch.inference_mode():
        every_step = timed(lambda: [model(c) for c in images.split(batch)])
        result = {"images": count, "batch": batch, "every_step": {
            "images_per_second": every_step, "macs_per_image": step_macs[-1]}, "budgets": []}
        for q in (0.25, 0.5, 1.0):
            predictor = Predictor(model, thresholds=thresholds[round(q * 20) - 1])
            answers = [predictor.run(c) for c in images.split(batch)]
            macs = float(torch.cat([a.macs for a in answers]).double().mean())
            speed = timed(lambda p=predictor: [p.run(c) for c in images.split(batch)])
            time_saving, macs_saving = speed / every_step, step_macs[-1] / macs
            result["budgets"].append({"q": q, "images_per_second": speed,
                                      "macs_per_image": macs, "time_speedup": time_saving,
                                      "macs_speedup": macs_saving,
                                      "time_over_macs_speedup": time_saving / macs_saving})
    return result


# ----------------------------------------------------------------------------------------------
# 4. onnxruntime's CUDA provider against PyTorch on CUDA

def onnx_cuda_check(sizes: dict, device, deadline: float) -> dict:
    if time.time() > deadline:
        return {"skipped": "time limit"}
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"skipped": f"onnxruntime has no {provider} here (providers: "
                           f"{ort.get_available_providers()})"}
    from glancefocus.export import export_onnx
    from glancefocus.model import GlanceFocusNet

    config = config_for(sizes)
    torch.manual_seed(0)
    model = GlanceFocusNet(config.model).eval()
    size, batch = config.data.image_size, sizes["exit_batch"]
    images = torch.randn(batch, config.model.in_chans, size, size)
    with tempfile.TemporaryDirectory(prefix="gf-gpu-check-") as folder:
        manifest = export_onnx(model, folder, image_size=size)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = {}
        for entry in manifest["steps"]:
            name = entry["graph"]
            if name not in sessions:
                sessions[name] = ort.InferenceSession(str(Path(folder) / name), options,
                                                      providers=[provider])
        steps = [sessions[entry["graph"]] for entry in manifest["steps"]]
        names = [[o.name for o in s.get_outputs()] for s in steps]
        state_names = list(manifest["state_batch_axis"])
        array = images.numpy()

        def onnx_pass():
            state = {}
            for session, outputs in zip(steps, names):
                out = dict(zip(outputs, session.run(None, {"images": array, **state})))
                state = {name: out[f"next_{name}"] for name in state_names}
            return out["logits"]

        def torch_pass():
            with torch.inference_mode():
                logits = model_device(images_device).logits
            return logits[-1].float().cpu().numpy()

        model_device = model.to(device)
        images_device = images.to(device)

        def seconds(run) -> float:
            run()
            synchronise(device)
            rounds = []
            for _ in range(sizes["rounds"] + 2):
                began = time.perf_counter()
                run()
                synchronise(device)
                rounds.append(time.perf_counter() - began)
            return statistics.median(rounds)

        onnx_seconds, torch_seconds = seconds(onnx_pass), seconds(torch_pass)
        difference = float(abs(onnx_pass() - torch_pass()).max())
    return {"provider": provider, "batch": batch,
            "onnx_images_per_second": batch / onnx_seconds,
            "torch_images_per_second": batch / torch_seconds,
            "onnx_over_torch": torch_seconds / onnx_seconds,
            "last_step_logits_max_abs_difference": difference,
            "note": "every step of every image, float32; the onnx time includes copying the "
                    "input and the state to and from the device at every step"}


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (what the tests run)")
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="seconds after which the remaining checks are skipped (reported)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    began = time.time()
    deadline = began + args.time_limit
    if args.smoke:
        device, sizes = torch.device("cpu"), SMOKE
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --smoke for the CPU check of this script")
    else:
        device, sizes = torch.device("cuda"), FULL
    if device.type == "cuda":
        torch.empty(1, device=device)  # make the context
    result = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else "cpu"),
              "smoke": args.smoke, "torch": torch.__version__, "sizes": {
                  k: v for k, v in sizes.items() if k != "overrides"},
              "cuda_context_bytes": cuda_context_bytes(device)}
    for name, check in (("memory", memory_check), ("fit", fit_check),
                        ("early_exit", early_exit_check), ("onnx_cuda", onnx_cuda_check)):
        started = time.time()
        try:
            result[name] = check(sizes, device, deadline)
        except Exception as exc:  # report and go on: the other checks still say something
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result[f"{name}_seconds"] = round(time.time() - started, 1)
    result["seconds"] = round(time.time() - began, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
