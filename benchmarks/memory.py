"""How much memory does one training step need? The package's count (glancefocus.train.memory,
the one `train.micro_batch=auto` and `glancefocus memory` use), as a benchmark writing JSON.

    python benchmarks/memory.py --preset resnet50 [--json FILE] [--batch 256]
        [--micro-batches 256,128,64,32] [--amp none,bf16,fp16] [--threads N] [--no-cuda]
        [key=value ...]

One row per stage (1/3, 2, one-stage), micro-batch, AMP mode and activation checkpointing, with
the parts of the estimate (see glancefocus/train/memory.py); the authors' setting (float32, one
pass of 256 images, no checkpointing) marked with authors_setting=true. When CUDA is available
every configuration also runs two real steps on the GPU and reports
torch.cuda.max_memory_allocated of the second as `measured_bytes`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from glancefocus.config import load_config
from glancefocus.presets import assumed_num_classes, get_preset
from glancefocus.train.memory import KINDS, SavedTensorCounter  # noqa: F401 - re-exported
from glancefocus.train.memory_command import AMPS, memory_rows, table_lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet50")
    parser.add_argument("--batch", type=int, default=256, help="effective batch (train.batch_size)")
    parser.add_argument("--micro-batches", default="256,128,64,32")
    parser.add_argument("--amp", default=",".join(AMPS), help="AMP modes to count")
    parser.add_argument("--stages", default=",".join(KINDS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-cuda", action="store_true", help="skip the measured GPU steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    micro_batches = [int(b) for b in args.micro_batches.split(",")]
    amps = args.amp.split(",")
    if any(a not in AMPS for a in amps):
        parser.error("--amp takes none, bf16, fp16")
    if any(args.batch % m for m in micro_batches):
        parser.error(f"every micro-batch must divide --batch {args.batch}")
    config = load_config(base=get_preset(args.preset),
                         overrides=["model.pretrained=false", f"train.batch_size={args.batch}",
                                    *args.overrides])
    if config.model.num_classes is None:  # training reads it from the data
        config.model.num_classes = assumed_num_classes(config)
    cuda = torch.cuda.is_available() and not args.no_cuda
    rows = memory_rows(config, micro_batches, amps, args.stages.split(","), measure=cuda)
    result = {"rows": rows, "settings": {
        "preset": args.preset, "method": (
            "saved_tensors_hooks at micro-batches 2 and 4 (fake tensors on a CPU), linear in the "
            "micro-batch"), "cuda_measured": cuda, "torch": torch.__version__}}
    print("\n".join(table_lines(rows)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
