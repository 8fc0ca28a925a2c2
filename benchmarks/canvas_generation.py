"""Time the generation of one training epoch of cluttered-MNIST canvases; prints JSON.

    python benchmarks/canvas_generation.py [--canvases 20000] [--repeats 3]
"""
import argparse
import json
import time

import torch

from glancefocus.data.cluttered_mnist import load_mnist_digits, make_canvases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvases", type=int, default=20000)
    parser.add_argument("--canvas-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    digits, labels = load_mnist_digits("train")
    seconds = []
    for repeat in range(args.repeats):
        gen = torch.Generator().manual_seed(repeat)
        start = time.perf_counter()
        make_canvases(digits, labels, args.canvases, args.canvas_size, 8, 8, gen)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"canvases": args.canvases, "canvas_size": args.canvas_size,
                      "threads": torch.get_num_threads(), "seconds": seconds,
                      "best_seconds": min(seconds)}))


if __name__ == "__main__":
    main()
