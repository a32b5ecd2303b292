"""The on-disk dataset cache: memory-mappable cells, labels and metadata.

A dataset is a directory::

    dataset.json     metadata (format version, shape, classes, channels, source,
                     import summary, a content hash)
    images.npy       uint16 [N, C, S, S], cells already fitted to the input size
    labels.npy       int16 [N], index into ``class_names``; -1 means unlabeled
    object_ids.npy   int64 [N], the instrument's object numbers
    truth_<name>.npy optional per-cell ground truth (synthetic data: ``dead``,
                     ``debris``, ``stage``), each shaped [N]

Training memory-maps ``images.npy`` instead of re-reading thousands of TIFFs.
Reading validates every array against ``dataset.json`` so a truncated copy or
files from two different imports are refused with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowsort.errors import UserError

FORMAT = "flowsort-dataset"
FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
UNLABELED = -1


@dataclass(frozen=True)
class CellDataset:
    """Cells fitted to one square input size, with labels and provenance."""

    images: np.ndarray
    labels: np.ndarray
    object_ids: np.ndarray
    class_names: tuple[str, ...]
    channels: tuple[int, ...]
    channel_names: tuple[str, ...]
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint16:
            raise ValueError(f"images must be uint16 [N, C, S, S], got {self.images.dtype} {self.images.shape}")
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images must be square, got {self.images.shape[2]}x{self.images.shape[3]}")
        if self.images.shape[1] != len(self.channels) or len(self.channels) != len(self.channel_names):
            raise ValueError(
                f"{self.images.shape[1]} image channels but channels={self.channels} "
                f"and channel_names={self.channel_names}"
            )
        for name, array in {"labels": self.labels, "object_ids": self.object_ids, **self.truth}.items():
            if array.shape != (n,):
                raise ValueError(f"{name} has shape {array.shape}, expected ({n},)")
        if n and (self.labels.max(initial=UNLABELED) >= len(self.class_names) or self.labels.min() < UNLABELED):
            raise ValueError(f"labels outside 0..{len(self.class_names) - 1} (or {UNLABELED} for unlabeled)")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def input_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def is_labeled(self) -> bool:
        return bool(len(self)) and bool((self.labels != UNLABELED).any())

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels != UNLABELED], minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts)}

    def subset(self, index: np.ndarray) -> CellDataset:
        """The cells at ``index`` (an integer or boolean array), loaded into memory."""
        return CellDataset(
            images=np.asarray(self.images[index]),
            labels=self.labels[index],
            object_ids=self.object_ids[index],
            class_names=self.class_names,
            channels=self.channels,
            channel_names=self.channel_names,
            truth={name: values[index] for name, values in self.truth.items()},
            source=self.source,
            summary=self.summary,
        )


def content_hash(dataset: CellDataset) -> str:
    """SHA-256 over pixels, labels and ids: the provenance a bundle records."""
    digest = hashlib.sha256()
    for array in (dataset.images, dataset.labels, dataset.object_ids):
        digest.update(np.ascontiguousarray(array).data)
    digest.update(json.dumps(list(dataset.class_names)).encode())
    return digest.hexdigest()


def write_dataset(path: str | Path, dataset: CellDataset) -> Path:
    """Write ``dataset`` to the directory ``path`` (created; existing files replaced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"images": dataset.images, "labels": dataset.labels.astype(np.int16), "object_ids": dataset.object_ids.astype(np.int64)}
    arrays.update({f"truth_{name}": values for name, values in dataset.truth.items()})
    for name, array in arrays.items():
        np.save(path / f"{name}.npy", np.ascontiguousarray(array))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "n_cells": len(dataset),
        "shape": list(dataset.images.shape),
        "input_size": dataset.input_size,
        "class_names": list(dataset.class_names),
        "class_counts": dataset.class_counts(),
        "channels": list(dataset.channels),
        "channel_names": list(dataset.channel_names),
        "truth": {name: values.dtype.str for name, values in sorted(dataset.truth.items())},
        "source": dataset.source,
        "summary": dataset.summary,
        "content_hash": content_hash(dataset),
    }
    # Metadata last: a crash mid-write leaves no dataset.json claiming arrays that are not there.
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Parse and check ``dataset.json`` without touching the arrays."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise UserError(
            f"{path} is not a flowsort dataset: {METADATA_FILE} is missing "
            "(create one with `flowsort import ideas|montage|synthetic ... -o DIR`)"
        )
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta_path} is unreadable or not JSON: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not a flowsort dataset (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{meta_path} has dataset format version {metadata.get('format_version')}, "
            f"this flowsort reads version {FORMAT_VERSION}: re-import the data"
        )
    return metadata


def _load_array(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, mmap: bool) -> np.ndarray:
    file = path / f"{name}.npy"
    try:
        array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as exc:
        raise UserError(f"dataset {path} is incomplete: {file.name} is missing") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"dataset file {file} is truncated or corrupt ({exc}); re-import the data") from exc
    if array.shape != shape or array.dtype != dtype:
        raise UserError(
            f"dataset file {file} holds {array.dtype} {list(array.shape)} but {METADATA_FILE} "
            f"promises {np.dtype(dtype)} {list(shape)}: the files come from different imports"
        )
    return array


def read_dataset(path: str | Path, mmap: bool = True) -> CellDataset:
    """Open a dataset written by :func:`write_dataset`; images are memory-mapped by default."""
    path = Path(path)
    metadata = read_metadata(path)
    shape = tuple(metadata["shape"])
    n = shape[0]
    images = _load_array(path, "images", shape, np.dtype(np.uint16), mmap)
    labels = _load_array(path, "labels", (n,), np.dtype(np.int16), mmap=False)
    object_ids = _load_array(path, "object_ids", (n,), np.dtype(np.int64), mmap=False)
    truth = {
        name: _load_array(path, f"truth_{name}", (n,), np.dtype(dtype), mmap=False)
        for name, dtype in metadata["truth"].items()
    }
    try:
        return CellDataset(
            images=images,
            labels=labels,
            object_ids=object_ids,
            class_names=tuple(metadata["class_names"]),
            channels=tuple(metadata["channels"]),
            channel_names=tuple(metadata["channel_names"]),
            truth=truth,
            source=metadata.get("source", {}),
            summary=metadata.get("summary", {}),
        )
    except ValueError as exc:
        raise UserError(f"dataset {path} is inconsistent: {exc}") from exc
