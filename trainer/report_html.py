"""The evaluation report as one self-contained HTML page.

Why one file with the PNGs inlined as base64 data URIs: it is mailed, attached
to lab notebooks and opened on instrument PCs, where a folder of loose images
gets separated from its page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowsort.html_page import escape as _e
from flowsort.html_page import page, png_figure
from flowsort.html_page import table as _table
from trainer.report_text import format_metric

def render_report(report: dict[str, Any], folder: Path) -> str:
    """The page for ``report`` (from :func:`trainer.evaluation.evaluate`), figures read from ``folder``."""
    figures = {name: folder / file for name, file in report.get("figures", {}).items()}
    sections = [
        f"<p class='note'>model {_e(report['bundle']['path'])} "
        f"(ONNX sha256 {_e(report['bundle']['content_hash'][:16])}…) on dataset {_e(report['dataset'].get('path', ''))}, "
        f"{report['dataset']['n_cells']:,} cells</p>",
        _summary(report),
        _classification("Model classes", report),
    ]
    if "merged" in report:
        sections.append(_classification("Merged classes: " + "; ".join(report["merged"]["merges"]), report["merged"]))
    if "class_mix" in report:
        sections.append(_class_mix(report["class_mix"]))
    calibration = report["calibration"]
    sections.append(
        "<h2>Calibration</h2>"
        f"<p>Expected calibration error ({calibration['bins']} bins, {calibration['n_labeled']:,} labeled cells): "
        f"{format_metric(calibration['ece_before'])} before and {format_metric(calibration['ece_after'])} after temperature scaling "
        f"(T = {calibration['temperature']:.3f}).</p>" + _figure(figures.get("reliability"), "reliability diagram")
    )
    sections.append(_knn(report))
    sections.append(_dead_cells(report, figures.get("most_flagged")))
    sections.append(
        "<h2>Embedding map</h2>"
        + _figure(figures.get("embedding_map"), "t-SNE of the embedding (cosine), coloured by true class; crosses are cells "
                  "the dead-cell detector flags", missing="too few cells for a map")
    )
    sections.append(
        "<h2>Cells</h2>"
        + _figure(figures.get("examples"), "example cells per class, channels side by side")
        + _figure(figures.get("misclassified"), "misclassified cells by kind of mistake", missing="no misclassified cells")
    )
    return page("flowsort evaluation", sections)


def _summary(report: dict[str, Any]) -> str:
    rows = [
        ("accuracy", format_metric(report["accuracy"])),
        ("balanced accuracy", format_metric(report["balanced_accuracy"])),
        ("labeled cells", f"{report['n_labeled']:,}"),
    ]
    if "merged" in report:
        rows += [("merged accuracy", format_metric(report["merged"]["accuracy"])),
                 ("merged balanced accuracy", format_metric(report["merged"]["balanced_accuracy"]))]
    if "class_mix" in report:
        rows.append(("accuracy at the class mix", format_metric(report["class_mix"]["accuracy"])))
    knn = report["knn"]
    rows += [
        (f"k-NN accuracy (k={knn['k']})" if knn else "k-NN accuracy", format_metric(knn["accuracy"] if knn else None)),
        ("ECE before / after temperature", f"{format_metric(report['calibration']['ece_before'])} / {format_metric(report['calibration']['ece_after'])}"),
        ("flagged dead", f"{report['dead_cells']['flagged_fraction']:.2%}"),
        ("dead-cell AUROC", format_metric(report["dead_cells"]["auroc"])),
    ]
    return "<h2>Summary</h2>" + _table(("metric", "value"), rows)


def _classification(title: str, metrics: dict[str, Any]) -> str:
    names = metrics["class_names"]
    per_class = _table(
        ("class", "precision", "recall", "F1", "support"),
        [(name, format_metric(m["precision"]), format_metric(m["recall"]), format_metric(m["f1"]), f"{m['support']:,}") for name, m in metrics["per_class"].items()],
    )
    confusion = _table(
        ("true \\ predicted", *names),
        [(name, *(f"{count:,}" for count in row)) for name, row in zip(names, metrics["confusion_matrix"])],
        diagonal=True,
    )
    return (
        f"<h2>{_e(title)}</h2><p>accuracy {format_metric(metrics['accuracy'])}, balanced accuracy {format_metric(metrics['balanced_accuracy'])} "
        f"on {metrics['n_labeled']:,} labeled cells</p>{per_class}<p>Confusion matrix (rows: true class)</p>{confusion}"
    )


def _class_mix(metrics: dict[str, Any]) -> str:
    rows = [(name, f"{share:.2%}", format_metric(metrics["recall"][name])) for name, share in metrics["mix"].items()]
    return (
        f"<h2>At the class mix</h2><p>accuracy {format_metric(metrics['accuracy'])}, balanced accuracy "
        f"{format_metric(metrics['balanced_accuracy'])} for a population with this mix: probabilities re-weighted to it "
        "by Bayes' rule (as the streamer's sample_prior does), each class's recall weighted by its share</p>"
        + _table(("class", "share", "recall"), rows)
    )


def _knn(report: dict[str, Any]) -> str:
    knn = report["knn"]
    if not knn:
        return "<h2>k-NN on the embedding</h2><p>too few labeled cells</p>"
    merged = report.get("merged", {}).get("knn")
    merged_text = f"; merged classes: accuracy {format_metric(merged['accuracy'])}" if merged else ""
    return (
        f"<h2>k-NN on the embedding</h2><p>accuracy {format_metric(knn['accuracy'])}, balanced accuracy "
        f"{format_metric(knn['balanced_accuracy'])} (k = {knn['k']}, {knn['n_labeled']:,} labeled cells){merged_text}.</p>"
        f"<p class='note'>{_e(knn['protocol'])}</p>"
    )


def _dead_cells(report: dict[str, Any], gallery: Path | None) -> str:
    dead = report["dead_cells"]
    rows = [
        ("threshold (from the bundle)", f"{dead['threshold']:.3f}"),
        ("flagged", f"{dead['n_flagged']:,} of {dead['n_cells']:,} ({dead['flagged_fraction']:.2%})"),
    ]
    if "n_dead_or_debris" in dead:
        rows += [
            ("cells known dead or debris", f"{dead['n_dead_or_debris']:,}"),
            ("flagged among dead or debris", format_metric(dead["flagged_fraction_dead_or_debris"])),
            ("flagged among live", format_metric(dead["flagged_fraction_live"])),
            ("AUROC, dead score: dead or debris vs live", format_metric(dead["auroc"])),
        ]
    return "<h2>Dead cells</h2>" + _table(("", "value"), rows) + _figure(gallery, "cells with the highest dead-cell scores")


def _figure(path: Path | None, caption: str, missing: str | None = None) -> str:
    if path is None:
        return f"<p class='note'>{_e(missing)}</p>" if missing else ""
    return png_figure(path.read_bytes(), caption)
