"""Images in flight through an exported model's steps, each leaving as soon as it is confident.

This is the runtime's early-exit loop, written once: `ExportedPredictor.run` puts a whole batch
in and advances until nothing is left; the server (glancefocus_runtime.server) also lets new
images join at the glance while earlier ones are still at their focus steps. Every image carries
its own thresholds, so requests with different budgets share one batch. Images whose next steps
use the same graph run in one call: a recurrent classifier's focus graph serves steps 2..T alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import exit_rule


@dataclass
class Finished:
    """One image that left the pool."""

    tag: Any                   # what add() was given for it
    label: int
    confidence: float          # max softmax probability at the exit step
    exit_step: int             # 1-based: 1 = the glance alone
    macs: int                  # multiply-adds spent on it
    boxes: np.ndarray          # [exit_step, 4] (x0, y0, x1, y1) looked at, model-input pixels
    probabilities: np.ndarray  # [K] float32 softmax at the exit step


class ExitPool:
    """The images in flight through an ExportedModel, with their state between steps."""

    def __init__(self, model):
        self.model = model
        self.graph_of_step = [entry["graph"] for entry in model.manifest["steps"]]
        self.waiting: dict = {}   # graph name -> [rows waiting for that graph]
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, images: np.ndarray, thresholds: np.ndarray, tags: Sequence) -> None:
        """Images [N, C, H, W] to start at the glance, with thresholds [N, T] (or [T] for all)
        and one tag each, handed back with their answers."""
        images = self.model.check_images(images)
        n, steps = images.shape[0], self.model.max_steps
        thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n, steps))
        if len(tags) != n:
            raise ValueError(f"need one tag per image: {n} images, {len(tags)} tags")
        rows = {"images": images, "state": {}, "thresholds": thresholds,
                "steps": np.ones(n, dtype=np.int64),
                "boxes": np.full((n, steps, 4), -1, dtype=np.int64), "tags": list(tags)}
        self._wait(self.graph_of_step[0], rows)
        self.size += n

    def batch_sizes(self) -> list[int]:
        """The number of images each graph call of the next advance() will run."""
        return [sum(len(rows["tags"]) for rows in parts) for parts in self.waiting.values()]

    def tags(self) -> list:
        """The tags of every image in flight."""
        return [tag for parts in self.waiting.values() for rows in parts for tag in rows["tags"]]

    def advance(self) -> list[Finished]:
        """Run every image in flight through its next step (one call per graph): the images
        that exit are returned, the others wait for their next step."""
        groups, self.waiting = self.waiting, {}
        finished = []
        for parts in groups.values():
            finished += self._run(_join(parts, self.model.state_axis))
        self.size -= len(finished)
        return finished

    def _wait(self, graph: str, rows: dict) -> None:
        self.waiting.setdefault(graph, []).append(rows)

    def _run(self, rows: dict) -> list[Finished]:
        model, last = self.model, self.model.max_steps
        steps = rows["steps"]
        # every row here waits for the same graph: the first row's step picks it
        outputs = model.step(int(steps[0]), rows["images"], rows["state"] or None)
        confidences, labels = exit_rule.softmax_confidences(outputs["logits"])
        index = np.arange(len(steps))
        rows["boxes"][index, steps - 1] = outputs["box"]
        done = exit_rule.exits_now(confidences, rows["thresholds"][index, steps - 1],
                                   steps == last)
        finished = []
        if done.any():
            probabilities = exit_rule.softmax(outputs["logits"][done])
            for j, i in enumerate(np.flatnonzero(done)):
                step = int(steps[i])
                finished.append(Finished(
                    tag=rows["tags"][i], label=int(labels[i]),
                    confidence=float(confidences[i]), exit_step=step,
                    macs=int(model.step_macs[step - 1]), boxes=rows["boxes"][i, :step],
                    probabilities=probabilities[j]))
        if done.all():
            return finished
        keep = ~done
        if done.any():  # the exited images leave the batch
            survivors = _take(rows, keep, model.select(outputs, keep))
        else:
            survivors = dict(rows, state={name: outputs[f"next_{name}"]
                                          for name in model.state_axis})
        survivors["steps"] = survivors["steps"] + 1
        graphs = [self.graph_of_step[k - 1] for k in survivors["steps"]]
        if len(set(graphs)) == 1:
            self._wait(graphs[0], survivors)
        else:  # a cascaded classifier: each focus step has its own graph
            for graph in dict.fromkeys(graphs):
                mask = np.array([g == graph for g in graphs])
                self._wait(graph, _take(survivors, mask, _select_state(
                    survivors["state"], mask, model.state_axis)))
        return finished


def _take(rows: dict, keep: np.ndarray, state: dict) -> dict:
    return {"images": np.ascontiguousarray(rows["images"][keep]), "state": state,
            "thresholds": rows["thresholds"][keep], "steps": rows["steps"][keep],
            "boxes": rows["boxes"][keep],
            "tags": [tag for tag, k in zip(rows["tags"], keep) if k]}


def _select_state(state: dict, keep: np.ndarray, axes: dict) -> dict:
    return {name: np.ascontiguousarray(np.compress(keep, value, axis=axes[name]))
            for name, value in state.items()}


def _join(parts: list, axes: dict) -> dict:
    """Rows waiting for one graph, joined into one batch (each state along its batch axis)."""
    if len(parts) == 1:
        return parts[0]
    joined = {key: np.concatenate([p[key] for p in parts])
              for key in ("images", "thresholds", "steps", "boxes")}
    joined["tags"] = [tag for p in parts for tag in p["tags"]]
    joined["state"] = {name: np.concatenate([p["state"][name] for p in parts], axis=axes[name])
                       for name in parts[0]["state"]}
    return joined
