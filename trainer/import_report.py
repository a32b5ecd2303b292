"""Bookkeeping shared by the importers: problems, fitting statistics, the dataset.

Real exports are messy, and an import that dies on the 2,000th file wastes the
user's time. Importers therefore report each bad input here with its path and
go on with the good cells; ``strict`` turns the first problem into a
:class:`UserError` instead. :class:`CellCollector` fits every accepted cell to
the input size through the preprocessing contract and counts what fitting did,
so the import summary says how many cells were cropped or padded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engines.preprocessing import Fit, fit_action, fit_to_size
from flowsort.errors import UserError
from trainer.dataset import UNLABELED, CellDataset

MAX_STORED_PROBLEMS = 1000
MAX_PRINTED_PROBLEMS = 20
CANONICAL_CLASS_ORDERS = (("G1", "S_phase", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase"),)


class ImportReport:
    """Problems met during one import, plus the source facts worth recording."""

    def __init__(self, strict: bool = False, max_stored: int = MAX_STORED_PROBLEMS) -> None:
        self.strict = strict
        self.max_stored = max_stored
        self.problems: list[dict[str, str]] = []
        self.n_problems = 0
        self.bit_depths: set[int] = set()
        self.extra: dict[str, Any] = {}

    def problem(self, path: str | Path, reason: str) -> None:
        """Record a bad input; under ``strict`` stop the import right here."""
        if self.strict:
            raise UserError(
                f"{path}: {reason} (--strict makes every import problem fatal; "
                "fix the file or drop --strict to import the good cells and list the problems)"
            )
        self.n_problems += 1
        if len(self.problems) < self.max_stored:
            self.problems.append({"path": str(path), "reason": reason})


class CellCollector:
    """Accumulates cells fitted to ``size`` x ``size`` and builds the dataset."""

    def __init__(self, size: int, report: ImportReport) -> None:
        self.size = size
        self.report = report
        self._images: list[np.ndarray] = []
        self._labels: list[str | None] = []
        self._ids: list[np.ndarray] = []
        self.fits: Counter[str] = Counter()
        self.source_sizes: Counter[str] = Counter()

    def add(self, images: np.ndarray, label: str | None, object_ids: np.ndarray) -> None:
        """Add ``[N, C, H, W]`` cells of one source size and one class (None: unlabeled)."""
        height, width = images.shape[-2:]
        n = len(images)
        self._images.append(fit_to_size(images, self.size).astype(np.uint16, copy=False))
        self._labels.append(label)
        self._ids.append(np.asarray(object_ids, np.int64).reshape(n))
        self.fits[fit_action(height, width, self.size).value] += n
        self.source_sizes[f"{height}x{width}"] += n

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._ids)

    def build(
        self,
        channels: tuple[int, ...],
        channel_names: tuple[str, ...],
        source: dict[str, Any],
        n_skipped: int,
    ) -> CellDataset:
        """The dataset, cells ordered by class then object id, with its import summary.

        Classes are those that kept at least one cell, in :func:`class_order`.
        """
        if not self._ids:
            first = "; ".join(f"{p['path']}: {p['reason']}" for p in self.report.problems[:3])
            raise UserError(
                f"no cells imported from {source.get('path')}"
                + (f" ({self.report.n_problems} problems, first: {first})" if first else "")
            )
        class_names = class_order({label for label in self._labels if label is not None})
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.concatenate(
            [np.full(len(ids), index.get(label, UNLABELED), np.int16) for label, ids in zip(self._labels, self._ids)]
        )
        ids = np.concatenate(self._ids)
        order = np.lexsort((ids, labels))
        dataset = CellDataset(
            images=np.concatenate(self._images)[order],
            labels=labels[order],
            object_ids=ids[order],
            class_names=class_names,
            channels=channels,
            channel_names=channel_names,
            source=source,
        )
        summary = {
            "n_imported": len(dataset),
            "n_skipped": n_skipped,
            "class_counts": dataset.class_counts(),
            "input_size": self.size,
            "fit": {fit.value: self.fits[fit.value] for fit in Fit},
            "source_sizes": dict(self.source_sizes.most_common()),
            "bit_depths": sorted(self.report.bit_depths),
            **self.report.extra,
            "n_problems": self.report.n_problems,
            "problems": self.report.problems,
        }
        # The summary quotes the dataset's own class counts, so it is attached afterwards.
        return replace(dataset, summary=summary)


def class_order(names: set[str]) -> tuple[str, ...]:
    """Biological order for known stage names (G1 before S_phase ...), else sorted.

    A confusion matrix in G1, S, G2, M order reads as the cell cycle; alphabetical
    order would scatter it. Any name outside a known order falls back to sorting.
    """
    for canonical in CANONICAL_CLASS_ORDERS:
        if names <= set(canonical):
            return tuple(name for name in canonical if name in names)
    return tuple(sorted(names))


def format_summary(dataset: CellDataset, out: str | Path) -> str:
    """The human-readable account of an import printed by the CLI."""
    summary, source = dataset.summary, dataset.source
    channels = [
        f"Ch{c}" + ("" if name == f"Ch{c}" else f" ({name})") for c, name in zip(dataset.channels, dataset.channel_names)
    ]
    lines = [
        f"Imported {summary['n_imported']} cells from {source.get('path')} ({source.get('kind')}) into {out}",
        "  channels: " + ", ".join(channels),
    ]
    if dataset.class_names:
        counts = summary["class_counts"]
        lines.append("  classes:  " + ", ".join(f"{name} {counts[name]}" for name in dataset.class_names))
    else:
        lines.append("  classes:  none (unlabeled tree; labels are -1)")
    fits = ", ".join(f"{count} {fit.replace('_', ' ')}" for fit, count in summary["fit"].items() if count)
    lines.append(f"  fitted to {summary['input_size']}x{summary['input_size']}: {fits}")
    lines.append(
        "  source sizes: "
        + ", ".join(f"{size} ({count})" for size, count in list(summary["source_sizes"].items())[:8])
        + (f" and {len(summary['source_sizes']) - 8} more" if len(summary["source_sizes"]) > 8 else "")
    )
    depths = summary["bit_depths"]
    lines.append(
        "  bit depth: " + ", ".join(f"{d}-bit" for d in depths)
        + ("  (mixed: intensities are not on one scale)" if len(depths) > 1 else "")
    )
    if "empty_tiles" in summary:
        lines.append(
            f"  montages: {summary['n_montages']} read, {summary['n_montages_skipped']} skipped; "
            f"{summary['empty_tiles']} empty padding tiles left out"
        )
    lines.append(f"  skipped:  {summary['n_skipped']} cells; problems: {summary['n_problems']}")
    for problem in summary["problems"][:MAX_PRINTED_PROBLEMS]:
        lines.append(f"    {problem['path']}: {problem['reason']}")
    if summary["n_problems"] > MAX_PRINTED_PROBLEMS:
        stored = len(summary["problems"])
        lines.append(
            f"    ... and {summary['n_problems'] - MAX_PRINTED_PROBLEMS} more "
            f"(the first {stored} are listed under summary.problems in {Path(out) / 'dataset.json'})"
        )
    return "\n".join(lines)
