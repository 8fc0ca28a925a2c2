"""manifest.json: what `glancefocus export` wrote next to the graphs, read and checked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

MANIFEST_NAME = "manifest.json"
FORMAT = "glancefocus-onnx"
FORMAT_VERSION = 1

REQUIRED = ("num_classes", "patch_size", "max_steps", "input", "preprocessing", "steps",
            "state_batch_axis", "macs_per_step")


class ManifestError(ValueError):
    """An exported folder is missing files or its manifest is not one this runtime reads."""


def load_manifest(folder: Union[str, Path]) -> dict:
    """The checked manifest of an exported folder."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"exported model folder '{folder}' does not exist (write one with "
                            "`glancefocus export CKPT OUT_DIR`)")
    if not path.is_file():
        raise ManifestError(f"'{folder}' holds no {MANIFEST_NAME}: not a folder written by "
                            "`glancefocus export`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"'{path}' is not valid JSON: {exc}") from None
    _check(manifest, path, folder)
    return manifest


def _check(manifest, path: Path, folder: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"'{path}': field 'format' must be '{FORMAT}'")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"'{path}': format_version {manifest.get('format_version')!r} is not "
                            f"{FORMAT_VERSION}, the one this glancefocus reads: export the "
                            "model again with this version")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ManifestError(f"'{path}' lacks the fields {', '.join(missing)}")
    steps = manifest["max_steps"]
    if len(manifest["steps"]) != steps or len(manifest["macs_per_step"]) != steps:
        raise ManifestError(f"'{path}': 'steps' and 'macs_per_step' must have max_steps={steps} "
                            "entries")
    for entry in manifest["steps"]:
        graph = folder / entry["graph"]
        if not graph.is_file():
            raise ManifestError(f"'{path}': step {entry['step']}'s graph '{graph}' is missing")
