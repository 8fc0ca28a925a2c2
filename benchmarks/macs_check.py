"""Does the encoder count agree with torch's FlopCounterMode? One row per timm model.

    python benchmarks/macs_check.py [--json FILE] [ARCH:P ...]

For each architecture at patch size P (random weights): the encoder's multiply-adds as
`glancefocus macs` counts them (glancefocus.macs.encoder_macs), FlopCounterMode's FLOPs / 2 on
the same encoder with timm's fused attention switched off (attention then runs as explicit
matrix products, which FlopCounterMode counts on every device), the BatchNorm channels our
count adds by the authors' rule, and the relative difference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from glancefocus.encoder import Encoder, create_backbone
from glancefocus.macs import encoder_macs

DEFAULT = ("resnet50:96", "densenet121:96", "efficientnet_b0:96", "mobilenetv3_large_100:96",
           "regnety_008:96", "convnext_tiny:96", "convnext_atto:96", "deit_tiny_patch16_224:96",
           "deit_small_patch16_224:112", "swin_tiny_patch4_window7_224:224")


def reference_macs(encoder: Encoder, patch: int) -> int:
    """FlopCounterMode's FLOPs / 2 of one image, attention as explicit matrix products."""
    for module in encoder.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    encoder.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, patch, patch))
    return counter.get_total_flops() // 2


def batchnorm_channels(encoder: Encoder) -> int:
    return sum(m.num_features for m in encoder.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def check(arch: str, patch: int) -> dict:
    torch.manual_seed(0)
    encoder = Encoder(create_backbone(arch, num_classes=1000, in_chans=3, pretrained=False,
                                      input_size=patch))
    ours = encoder_macs(encoder, (3, patch, patch), arch)
    reference = reference_macs(encoder, patch)
    return {"arch": arch, "patch_size": patch, "glancefocus": ours, "flop_counter": reference,
            "batchnorm_channels": batchnorm_channels(encoder),
            "relative_difference": (ours - reference) / reference}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT, help="ARCH:P pairs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for item in args.models:
        arch, _, patch = item.partition(":")
        rows.append(check(arch, int(patch or 96)))
        row = rows[-1]
        print(f"{arch:>32} P {row['patch_size']:>3}  ours {row['glancefocus']:>15,}  "
              f"FlopCounterMode {row['flop_counter']:>15,}  {row['relative_difference']:+.4%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
