"""Cells with known truth for the bench: ground truth in acquisition files, and the cell sources.

Ground truth travels two ways, both invisible to the service:

* in an acquisition file, as truth records (kind 3 of :mod:`streamer.recording`):
  a msgpack map with ``acquisition``, ``event_ids`` and the columns of
  :class:`Truth`;
* on the wire, as an extra ``x_truth`` key in a ``cells`` header (the protocol
  ignores unknown keys), holding the same columns for the message's cells. The
  simulator adds it with ``--truth-in-messages``; ``flowsort record`` turns it
  into truth records.

A :class:`CellSet` is what the simulator, replay and ``bench e2e`` send: uint16
images, their channel numbers and, when known, their truth. It comes from the
synthetic cytometer (:func:`synthetic_cells`), a dataset folder
(:func:`dataset_cells`) or the cells of an acquisition file
(:func:`recording_cells`). :func:`write_dataset_acquisition` turns a dataset into
an acquisition file (``flowsort import ... --to-acquisition``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from flowsort.errors import UserError
from streamer import protocol as p
from streamer.codec import CellsEncoder, decode_ingest
from streamer.protocol import Rejected
from streamer.recording import KIND_TRUTH, AcquisitionReader, AcquisitionWriter

if TYPE_CHECKING:
    from trainer.dataset import CellDataset

TRUTH_KEY = "x_truth"
TRUTH_KEY_BYTES = msgpack.packb(TRUTH_KEY)
IMPORT_RATE = 1000.0  # cells/s: the Poisson timing given to imported cells (replay can re-time them)
IMPORT_SEED = 0
TRUTH_CHUNK = 4096  # cells per truth record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Truth:
    """What each cell really is: ``label`` indexes ``class_names`` (-1 unknown); dead and debris when known."""

    class_names: tuple[str, ...]
    label: np.ndarray  # int16 [N]
    dead: np.ndarray | None = None  # bool [N]
    debris: np.ndarray | None = None  # bool [N]

    def __len__(self) -> int:
        return len(self.label)

    def fields(self) -> dict[str, Any]:
        """The msgpack-ready columns (truth records and ``x_truth``)."""
        out: dict[str, Any] = {"class_names": list(self.class_names),
                               "label": np.ascontiguousarray(self.label, "<i2").tobytes()}
        for name in ("dead", "debris"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.ascontiguousarray(value, np.uint8).tobytes()
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Truth:
        names = tuple(fields["class_names"])
        label = np.frombuffer(fields["label"], "<i2").astype(np.int16)
        flags = {name: np.frombuffer(fields[name], np.uint8).astype(bool) for name in ("dead", "debris")
                 if fields.get(name) is not None}
        for name, value in flags.items():
            if len(value) != len(label):
                raise ValueError(f"truth column {name} has {len(value)} values for {len(label)} cells")
        return cls(names, label, flags.get("dead"), flags.get("debris"))

    def take(self, index: np.ndarray) -> Truth:
        return Truth(self.class_names, self.label[index],
                     None if self.dead is None else self.dead[index],
                     None if self.debris is None else self.debris[index])

    @staticmethod
    def concatenate(parts: Sequence[Truth]) -> Truth:
        """One truth for several parts; class indices are remapped onto the union of their class names."""
        names: list[str] = []
        for part in parts:
            names += [name for name in part.class_names if name not in names]
        labels = []
        for part in parts:
            mapping = np.array([names.index(name) for name in part.class_names] + [-1], np.int16)
            labels.append(mapping[part.label])  # label -1 picks the trailing -1
        n = [len(part) for part in parts]

        def flags(name: str) -> np.ndarray | None:
            if all(getattr(part, name) is None for part in parts):
                return None
            return np.concatenate([np.zeros(k, bool) if getattr(part, name) is None else getattr(part, name)
                                   for part, k in zip(parts, n)])

        label = np.concatenate(labels) if labels else np.zeros(0, np.int16)
        return Truth(tuple(names), label.astype(np.int16), flags("dead"), flags("debris"))


def truth_record(acquisition: str, event_ids: np.ndarray, truth: Truth) -> dict[str, Any]:
    return {p.ACQUISITION: acquisition, p.EVENT_IDS: np.ascontiguousarray(event_ids, "<u8").tobytes(),
            **truth.fields()}


def write_truth(writer: AcquisitionWriter, acquisition: str, event_ids: np.ndarray, truth: Truth,
                chunk: int = TRUTH_CHUNK) -> None:
    """Truth records for ``event_ids`` (in chunks, so no record grows large)."""
    for start in range(0, len(event_ids), chunk):
        index = np.arange(start, min(start + chunk, len(event_ids)))
        writer.write_truth(truth_record(acquisition, event_ids[index], truth.take(index)))


def header_truth(header: dict[str, Any], count: int) -> Truth | None:
    """The ``x_truth`` of a decoded cells header, or None (absent or unreadable)."""
    fields = header.get(TRUTH_KEY)
    if not isinstance(fields, dict):
        return None
    try:
        truth = Truth.from_fields(fields)
    except (KeyError, TypeError, ValueError):
        return None
    return truth if len(truth) == count else None


class TruthIndex:
    """Truth of recorded cells, looked up by (acquisition, event id)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, Truth]]] = {}

    def add(self, acquisition: str, event_ids: np.ndarray, truth: Truth) -> None:
        self._parts.setdefault(acquisition, []).append((np.asarray(event_ids, np.uint64), truth))

    def __bool__(self) -> bool:
        return bool(self._parts)

    def lookup(self, acquisition: Sequence[str], event_ids: np.ndarray) -> Truth | None:
        """Truth for each cell (acquisition per cell, event ids); label -1 where not known."""
        if not self._parts:
            return None
        merged = {name: (np.concatenate([ids for ids, _ in parts]), Truth.concatenate([t for _, t in parts]))
                  for name, parts in self._parts.items()}
        everything = Truth.concatenate([truth for _, truth in merged.values()])
        names = everything.class_names
        n = len(event_ids)
        label = np.full(n, -1, np.int16)
        dead = np.zeros(n, bool) if everything.dead is not None else None
        debris = np.zeros(n, bool) if everything.debris is not None else None
        acquisition = np.asarray(acquisition, dtype=object)
        for name, (ids, truth) in merged.items():
            mine = np.flatnonzero(acquisition == name)
            if not len(mine):
                continue
            order = np.argsort(ids, kind="stable")
            position = np.searchsorted(ids[order], event_ids[mine])
            position = np.minimum(position, len(ids) - 1)
            found = ids[order][position] == event_ids[mine]
            source = order[position[found]]
            cells = mine[found]
            mapping = np.array([names.index(c) for c in truth.class_names] + [-1], np.int16)
            label[cells] = mapping[truth.label[source]]
            if dead is not None and truth.dead is not None:
                dead[cells] = truth.dead[source]
            if debris is not None and truth.debris is not None:
                debris[cells] = truth.debris[source]
        return Truth(names, label, dead, debris)


# ---------------------------------------------------------------------------- cell sets

@dataclass(frozen=True)
class CellSet:
    """Cells to send: uint16 images [N, C, H, W] with their instrument channel numbers and truth."""

    images: np.ndarray
    channels: tuple[int, ...]
    truth: Truth | None
    description: str

    def __len__(self) -> int:
        return len(self.images)


def synthetic_cells(n: int, size: int, seed: int = 0, prior: str = "jurkat", dead_fraction: float | None = None,
                    debris_fraction: float | None = None) -> CellSet:
    """``n`` cells from the synthetic cytometer's pool: noise-free renders given fresh camera noise."""
    from trainer.synthetic import CHANNELS, DEAD_FRACTION, DEBRIS_FRACTION, STAGES, CellPool

    dead = DEAD_FRACTION if dead_fraction is None else dead_fraction
    debris = DEBRIS_FRACTION if debris_fraction is None else debris_fraction
    pool = CellPool(n, seed=seed, size=size, prior=prior, dead_fraction=dead, debris_fraction=debris)
    cells = pool.sample(n, np.random.default_rng(seed + 1))
    truth = Truth(STAGES, cells.stage.astype(np.int16), cells.dead.copy(), cells.debris.copy())
    return CellSet(np.ascontiguousarray(cells.images), CHANNELS, truth,
                   f"synthetic cytometer: {n} cells, {size}x{size}, prior {prior}, seed {seed}")


def dataset_truth(dataset: CellDataset) -> Truth | None:
    """A dataset's labels (and the simulator's dead/debris truth, when it has it)."""
    if not dataset.is_labeled and not dataset.truth:
        return None
    dead = dataset.truth.get("dead")
    debris = dataset.truth.get("debris")
    return Truth(tuple(dataset.class_names), np.asarray(dataset.labels, np.int16),
                 None if dead is None else np.asarray(dead, bool), None if debris is None else np.asarray(debris, bool))


def dataset_cells(path: str | Path) -> CellSet:
    from trainer.dataset import read_dataset

    dataset = read_dataset(path, mmap=False)
    return CellSet(np.ascontiguousarray(dataset.images), tuple(dataset.channels), dataset_truth(dataset),
                   f"dataset {path}: {len(dataset)} cells")


def recording_cells(path: str | Path) -> CellSet:
    """Every cell of an acquisition file's valid cells messages, with its truth where the file has it."""
    parts: list[np.ndarray] = []
    acquisitions: list[str] = []
    ids: list[np.ndarray] = []
    channels: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None
    recording = read_recording(path)
    for message in recording.messages:
        cells = message.decoded
        if cells is None:
            continue
        pixels = cells.pixels
        if cells.dtype != "uint16":
            pixels = np.clip(np.rint(pixels), 0, 65535) if cells.dtype == "float32" else pixels
            pixels = pixels.astype(np.uint16)
        if channels is None:
            channels, shape = cells.channels, pixels.shape[1:]
        elif cells.channels != channels or pixels.shape[1:] != shape:
            raise UserError(f"{path}: cells with different channels or sizes ({list(cells.channels)} "
                            f"{list(pixels.shape[1:])} after {list(channels)} {list(shape)}): use replay for it")
        parts.append(np.asarray(pixels))
        acquisitions += [cells.acquisition] * cells.count
        ids.append(cells.event_ids)
    if not parts:
        raise UserError(f"{path} holds no valid cells messages")
    event_ids = np.concatenate(ids)
    truth = recording.truth.lookup(acquisitions, event_ids) if recording.truth else None
    if truth is not None and not (truth.label >= 0).any() and truth.dead is None:
        truth = None
    images = np.ascontiguousarray(np.concatenate(parts), np.uint16)
    return CellSet(images, channels, truth, f"acquisition {path}: {len(images)} cells")


def load_cells(source: str, size: int, seed: int = 0, pool: int = 4096, prior: str = "jurkat") -> CellSet:
    """``synthetic``, an acquisition file or a dataset folder."""
    if source == "synthetic":
        return synthetic_cells(pool, size, seed=seed, prior=prior)
    path = Path(source)
    if path.is_dir():
        return dataset_cells(path)
    if path.is_file():
        return recording_cells(path)
    raise UserError(f"--cells {source!r}: expected 'synthetic', an acquisition file or a dataset folder")


# ---------------------------------------------------------------------------- acquisition files

@dataclass
class RecordedMessage:
    time_ns: int
    frames: list[bytes]
    decoded: p.CellsMessage | None  # None: not a valid cells message (sent as recorded)
    header: dict[str, Any] | None  # the cells header map, when decoded


@dataclass
class Recording:
    path: Path
    messages: list[RecordedMessage]
    truth: TruthIndex
    tail: str | None  # why the file's end was not readable (a torn last record), or None


def read_recording(path: str | Path) -> Recording:
    """Every message of an acquisition file (decoded where it is a valid cells message) and its truth.

    A torn or corrupt tail is tolerated: the records before it are used (and the reason kept).
    """
    reader = AcquisitionReader(path)
    messages: list[RecordedMessage] = []
    truth = TruthIndex()
    for record in reader:
        if record.kind == KIND_TRUTH:
            try:
                fields = record.header
                truth.add(fields[p.ACQUISITION], np.frombuffer(fields[p.EVENT_IDS], "<u8"), Truth.from_fields(fields))
            except Exception as exc:  # a foreign or damaged truth record: the cells are still usable
                log.warning("%s: skipping an unreadable truth record at byte %d (%s)", path, record.offset, exc)
            continue
        if record.kind != 2:
            continue
        decoded = header = None
        try:
            message = decode_ingest(record.frames)
        except Rejected:
            message = None
        if isinstance(message, p.CellsMessage):
            decoded = message
            header = msgpack.unpackb(record.frames[0], raw=False)
            carried = header_truth(header, message.count)
            if carried is not None:
                truth.add(message.acquisition, message.event_ids, carried)
        messages.append(RecordedMessage(record.time_ns, record.frames, decoded, header))
    return Recording(Path(path), messages, truth, reader.scan.tail)


def write_dataset_acquisition(dataset: CellDataset, path: str | Path, acquisition: str | None = None,
                              rate: float = IMPORT_RATE, seed: int = IMPORT_SEED, cells_per_message: int = 1) -> dict[str, Any]:
    """Write ``dataset`` as an acquisition file: its cells in a shuffled order, one message each (or blocks),
    timed as Poisson arrivals at ``rate`` cells/s, with the labels as truth records.

    Event ids are the dataset's object ids. Returns a summary.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        raise UserError(f"{path} exists: choose a new file for --to-acquisition (acquisition files are append-only)")
    n = len(dataset)
    if n == 0:
        raise UserError("the dataset holds no cells")
    acquisition = acquisition or path.stem
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    images = np.asarray(dataset.images)
    event_ids = np.asarray(dataset.object_ids, np.int64).astype(np.uint64)
    if len(np.unique(event_ids)) != n:
        event_ids = np.arange(1, n + 1, dtype=np.uint64)  # object ids repeat across class folders: renumber
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    start_ns = time.time_ns()
    capture = start_ns + (arrivals * 1e9).astype(np.int64)
    encoder = CellsEncoder(acquisition, dataset.channels, dataset.input_size)
    truth = dataset_truth(dataset)
    with AcquisitionWriter(path, {"source": dataset.source.get("kind", "dataset"), "acquisition": acquisition,
                                  "cells": n, "timing": f"poisson {rate:g} cells/s (imported)"}) as writer:
        for start in range(0, n, cells_per_message):
            index = order[start:start + cells_per_message]
            stamps = capture[start:start + len(index)]
            frames = encoder.encode(event_ids[index], np.ascontiguousarray(images[index]), capture_ns=stamps)
            writer.write([frames[0], np.ascontiguousarray(frames[1]).tobytes()], time_ns=int(stamps[-1]))
        if truth is not None:
            write_truth(writer, acquisition, event_ids[order], truth.take(order))
    return {"path": str(path), "acquisition": acquisition, "cells": n, "messages": -(-n // cells_per_message),
            "labeled": truth is not None, "duration_s": float(arrivals[-1]) if n else 0.0}


def print_acquisition_summary(summary: dict[str, Any]) -> None:
    labels = "with labels" if summary["labeled"] else "no labels"
    print(f"wrote acquisition file {summary['path']}: {summary['cells']:,} cells in {summary['messages']:,} messages "
          f"({labels}), acquisition {summary['acquisition']!r}, {summary['duration_s']:.1f} s at "
          f"{IMPORT_RATE:g} cells/s Poisson (replay can re-time it)")


def iter_truth_records(path: str | Path) -> Iterable[dict[str, Any]]:
    """The maps of an acquisition file's truth records."""
    for record in AcquisitionReader(path):
        if record.kind == KIND_TRUTH:
            yield record.header
