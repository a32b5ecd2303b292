"""Figures of the evaluation report: reliability diagram, embedding map and cell galleries.

Galleries are contact sheets (:mod:`trainer.gallery`, every channel of a cell
side by side) with rows chosen here: the model's mistakes by kind, and the
cells the dead-cell detector scores highest. Plots use matplotlib's
``Figure`` directly, so no global pyplot state or GUI backend is involved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import UNLABELED, CellDataset
from trainer.gallery import write_contact_sheet

DPI = 110
PER_ROW = 8  # cells per gallery row
MAX_CONFUSION_ROWS = 8  # the most frequent true -> predicted pairs
FLAGGED_ROWS = 3


def reliability_diagram(calibration: dict[str, Any], path: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling, with the cell count per bin."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 6), dpi=DPI)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for name, style in (("before", "o-"), ("after", "s-")):
        table = {key: np.array(value, dtype=float) for key, value in calibration[f"reliability_{name}"].items()}
        filled = table["count"] > 0
        ece = calibration[f"ece_{name}"]
        label = f"{name} temperature scaling" + (f" (ECE {ece:.3f})" if ece is not None else "")
        top.plot(table["confidence"][filled], table["accuracy"][filled], style, markersize=4, label=label)
    counts = np.array(calibration["reliability_after"]["count"], dtype=float)
    edges = np.linspace(0, 1, len(counts) + 1)
    bottom.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="0.5", edgecolor="white")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (temperature {calibration['temperature']:.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence (top-class probability)", ylabel="cells\n(after)")
    figure.tight_layout()
    figure.savefig(path)
    return path


def embedding_map(
    coordinates: np.ndarray, labels: np.ndarray, class_names: Sequence[str], flagged: np.ndarray, path: Path
) -> Path:
    """The t-SNE map coloured by true class (unlabeled grey), cells the dead-cell detector flags drawn as crosses."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 6), dpi=DPI)
    axes = figure.subplots()
    colours = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    unlabeled = labels == UNLABELED
    axes.scatter(*coordinates[unlabeled & ~flagged].T, s=6, color="0.75", label=f"unlabeled ({unlabeled.sum():,})")
    for k, name in enumerate(class_names):
        chosen = (labels == k) & ~flagged
        if chosen.any():
            axes.scatter(*coordinates[chosen].T, s=6, color=colours(k % colours.N), label=f"{name} ({(labels == k).sum():,})")
    axes.scatter(*coordinates[flagged].T, s=22, marker="x", color="black", linewidths=0.9,
                 label=f"flagged dead ({flagged.sum():,})")
    axes.set(title=f"embedding (t-SNE of {len(coordinates):,} cells)", xticks=[], yticks=[])
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    return path


def example_gallery(dataset: CellDataset, path: Path) -> Path:
    return write_contact_sheet(dataset, path, per_class=PER_ROW, title="example cells per class")


def misclassified_gallery(
    dataset: CellDataset, labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], path: Path
) -> Path | None:
    """One row per frequent kind of mistake, true -> predicted, with the range of the predicted class's probability."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero((labels != UNLABELED) & (predicted != labels))
    if not len(wrong):
        return None
    rows: dict[str, np.ndarray] = {}
    for (true, guess), _ in Counter(zip(labels[wrong].tolist(), predicted[wrong].tolist())).most_common(MAX_CONFUSION_ROWS):
        index = wrong[(labels[wrong] == true) & (predicted[wrong] == guess)]
        confidence = probabilities[index, guess]
        rows[f"{class_names[true]}\n→ {class_names[guess]}\np {confidence.min():.2f}–{confidence.max():.2f}"] = index
    title = f"misclassified cells, true → predicted with its probability ({len(wrong):,} mistakes)"
    return write_contact_sheet(dataset, path, per_class=PER_ROW, title=title, rows=rows)


def flagged_gallery(dataset: CellDataset, dead_score: np.ndarray, dead_cells: dict[str, Any], path: Path) -> Path:
    """The cells with the highest dead-cell scores, in rank order by rows; ``dead_cells`` is the report's section."""
    ranked = np.argsort(-dead_score, kind="stable")[: PER_ROW * FLAGGED_ROWS]
    rows = {
        f"#{start + 1}–{start + len(part)}\nscore {dead_score[part[-1]]:.1f}–{dead_score[part[0]]:.1f}": part
        for start, part in ((row * PER_ROW, ranked[row * PER_ROW : (row + 1) * PER_ROW]) for row in range(FLAGGED_ROWS))
        if len(part)
    }
    title = (f"highest dead-cell scores ({dead_cells['n_flagged']:,} cells above the threshold "
             f"{dead_cells['threshold']:.2f} are flagged)")
    return write_contact_sheet(dataset, path, per_class=PER_ROW, title=title, rows=rows)
