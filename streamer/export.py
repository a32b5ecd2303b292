"""Offline results: a recorded acquisition run through a bundle and the sort policy, written as FCS 3.1.

The cells take the service's path: the same message validation
(:func:`streamer.codec.decode_ingest` with the config's limits), the same
input adapter (channel order, dtype, size), the same policy and gates, and
the same row builder as ``flowsort serve --results``. Only lateness differs:
offline there is no deadline, so LATE is 0 and gates are as decided.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.base import Engine, predict_all
from engines.bundle import Bundle
from flowsort.errors import UserError
from streamer import protocol as p
from streamer.codec import Limits, decode_header, decode_ingest
from streamer.fcs import FcsWriter
from streamer.ingest import InputAdapter
from streamer.metrics import Metrics
from streamer.policy import Policy
from streamer.protocol import Rejected
from streamer.recording import AcquisitionReader
from streamer.fcs_layout import DEFAULT_EMBEDDING, ResultLayout, closing_keywords


@dataclass
class ExportSummary:
    path: Path
    acquisition: str
    events: int
    unclassified: Counter[str] = field(default_factory=Counter)  # cells without a result, by reason


def acquisitions_in(recording: Path) -> list[str]:
    """Names of the acquisitions whose cells a recording holds, in order of appearance."""
    names: dict[str, None] = {}
    for _, frames in AcquisitionReader(recording).messages():
        try:
            header = decode_header(frames[0])
        except Rejected:
            continue
        if header.get(p.TYPE) == p.CELLS and isinstance(header.get(p.ACQUISITION), str):
            names.setdefault(header[p.ACQUISITION])
    return list(names)


class _Batch:
    """Accepted cells waiting for the engine, flushed whole batches at a time."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.cells = 0

    def add(self, event_ids: np.ndarray, capture_ns: np.ndarray, pixels: np.ndarray) -> None:
        self.parts.append((event_ids, capture_ns, pixels))
        self.cells += len(event_ids)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, capture, pixels = (np.concatenate(column) for column in zip(*self.parts))
        self.parts, self.cells = [], 0
        return ids, capture, np.ascontiguousarray(pixels, np.uint16)


def export_fcs(recording: str | Path, bundle: Bundle, engine: Engine, policy: Policy, output: str | Path, *,
               limits: Limits = Limits(), acquisition: str | None = None, embedding: int = DEFAULT_EMBEDDING,
               datatype: str = "F") -> ExportSummary:
    """Write the results of one acquisition in ``recording`` to ``output`` (FCS 3.1, one event per cell).

    ``acquisition`` picks one where the recording holds several (it must then be given).
    """
    recording = Path(recording)
    layout = ResultLayout.for_policy(policy, bundle.embedding_dim, embedding)
    adapter = InputAdapter(bundle.channels, bundle.input_size, Metrics())
    chosen = acquisition
    unclassified: Counter[str] = Counter()
    batch = _Batch()
    writer: FcsWriter | None = None
    start_ns = end_ns = 0

    def wanted(name: str | None) -> bool:
        nonlocal chosen
        if name is None:
            return False
        if chosen is None:
            chosen = name
        if name == chosen:
            return True
        if acquisition is None:
            names = ", ".join(repr(n) for n in acquisitions_in(recording))
            raise UserError(f"{recording} holds cells of several acquisitions ({names}): "
                            "choose one with --acquisition NAME")
        return False

    def flush() -> None:
        ids, capture, cells = batch.take()
        outputs = predict_all(engine, cells)
        probabilities = policy.adjust(outputs.probabilities)
        columns = policy.decide(probabilities, outputs.dead_score)
        late = np.zeros(len(ids), bool)  # offline: no deadline
        writer.append(layout.rows(ids, capture, start_ns, probabilities, outputs.embedding, columns, late))

    try:
        for _, frames in AcquisitionReader(recording).messages():
            try:
                message = decode_ingest(frames, limits)
            except Rejected as rejected:
                if rejected.event_ids is not None and wanted(rejected.acquisition):
                    unclassified[rejected.reason] += len(rejected.event_ids)
                continue
            if not isinstance(message, p.CellsMessage) or not wanted(message.acquisition):
                continue
            try:
                cells = adapter.prepare(message)
            except Rejected as rejected:
                unclassified[rejected.reason] += message.count
                continue
            if len(cells.non_finite):
                unclassified[p.Reason.NON_FINITE] += len(cells.non_finite)
            ids, capture, pixels = cells.event_ids, cells.capture_ns, cells.pixels
            if not len(ids):
                continue
            if writer is None:
                start_ns = int(capture.min())
                writer = FcsWriter(output, layout.parameters(), layout.keywords(chosen, bundle.content_hash, start_ns),
                                   datatype)
            end_ns = max(end_ns, int(capture.max()))
            batch.add(ids, capture, pixels)
            if batch.cells >= engine.max_batch:
                flush()
        if writer is None:
            which = f" of acquisition {acquisition!r}" if acquisition else ""
            raise UserError(f"{recording} holds no cells{which} that could be classified"
                            + (f" ({dict(unclassified)})" if unclassified else ""))
        if batch.cells:
            flush()
        path = writer.close(closing_keywords(end_ns, unclassified, float(writer.maxima[0]), datatype))
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return ExportSummary(path, chosen, writer.events, unclassified)
