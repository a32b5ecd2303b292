"""The model bundle: one directory a user copies to the instrument PC.

::

    bundle.json      schema, classes, channels, input, normalization, temperature,
                     dead-cell detector, metrics, provenance, file checksums
    model.onnx       uint16 [N, C, S, S] -> probabilities, embedding, dead_score
    weights.pt       the torch state dict (for the torch engine and fine-tuning)
    validation.npz   held-out cells and labels (INT8 calibration and accuracy guards)

This module only reads and verifies bundles; it needs no torch, so the
streamer and the engines can load a bundle on a machine without the training
stack. The trainer writes bundles through :func:`write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowsort.errors import UserError

SCHEMA = "flowsort-bundle"
SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
VALIDATION_FILE = "validation.npz"
VALIDATION_SEEN_KEY = "validation_seen_in_training"  # provenance: the validation file holds training cells
OUTPUT_NAMES = ("probabilities", "embedding", "dead_score")
INPUT_NAME = "cells"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["class_names"])

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(channel["number"] for channel in self.manifest["channels"])

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(channel["name"] for channel in self.manifest["channels"])

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["model"]["embedding_dim"])

    @property
    def dead_threshold(self) -> float:
        return float(self.manifest["dead_cell_detector"]["threshold"])

    @property
    def class_prior(self) -> np.ndarray | None:
        """Class frequencies of the training data the probabilities hold for (None in bundles that lack them)."""
        counts = self.manifest["provenance"].get("train_class_counts")
        if not counts:
            return None
        values = np.array([float(counts.get(name, 0)) for name in self.class_names])
        return values / values.sum()

    @property
    def content_hash(self) -> str:
        """Identifies the model: the checksum of its ONNX graph."""
        return self.manifest["files"][ONNX_FILE]["sha256"]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def validation_seen_in_training(self) -> bool:
        """Whether the model was trained on every labeled cell, its validation file holding some of them."""
        return bool(self.manifest["provenance"].get(VALIDATION_SEEN_KEY, False))

    def validation_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Held-out uint16 cells [N, C, S, S] and their labels, stored at training time (training cells where
        :attr:`validation_seen_in_training`)."""
        with np.load(self.path / VALIDATION_FILE) as data:
            return data["images"], data["labels"]


def write_manifest(path: Path, manifest: dict[str, Any], files: list[str]) -> Path:
    """Record ``files`` (already written into ``path``) with checksums, then write ``bundle.json`` last."""
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        **manifest,
        "files": {name: {"sha256": file_digest(path / name), "bytes": (path / name).stat().st_size} for name in files},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path / MANIFEST


REQUIRED_KEYS = ("class_names", "channels", "input", "model", "normalization", "temperature", "dead_cell_detector", "files")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, refusing a corrupt, truncated or mismatched one with the reason."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not a flowsort model bundle: {MANIFEST} is missing (train one with `flowsort train`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest_path} is unreadable or not valid JSON ({exc}): the bundle is corrupt") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise UserError(f"{manifest_path} is not a flowsort bundle manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{manifest_path} has bundle schema version {manifest.get('schema_version')}; "
            f"this flowsort reads version {SCHEMA_VERSION}: re-package the model with a matching flowsort"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise UserError(f"{manifest_path} lacks {', '.join(missing)}: the bundle is incomplete")
    if len(manifest["channels"]) != manifest["model"]["in_channels"]:
        raise UserError(
            f"{manifest_path} lists {len(manifest['channels'])} channels but the model takes "
            f"{manifest['model']['in_channels']}: the manifest does not match the model"
        )
    for name in (ONNX_FILE, WEIGHTS_FILE, VALIDATION_FILE):
        if name not in manifest["files"]:
            raise UserError(f"{manifest_path} does not list {name}: the bundle is incomplete")
    if verify:
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise UserError(f"bundle file {file} is missing")
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise UserError(f"bundle file {file} has {size} bytes, the manifest says {expected['bytes']}: it is truncated or replaced")
            if file_digest(file) != expected["sha256"]:
                raise UserError(f"bundle file {file} fails its SHA-256 check: it is corrupt or was modified")
    return Bundle(path=path, manifest=manifest)
