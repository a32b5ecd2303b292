"""The evaluation report in words: the lines `flowsort evaluate` prints and the number format the HTML page shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_summary(report: dict[str, Any], html_path: Path) -> str:
    """The few lines `flowsort evaluate` prints, ending with where the HTML report is."""
    lines = [_accuracy_line("model classes", report)]
    if "merged" in report:
        lines.append(_accuracy_line("merged (" + "; ".join(report["merged"]["merges"]) + ")", report["merged"]))
    if "class_mix" in report:
        lines.append(format_class_mix(report["class_mix"]))
    knn = report["knn"]
    if knn:
        lines.append(f"  k-NN on the embedding (k={knn['k']}, cosine): accuracy {format_metric(knn['accuracy'])}")
    calibration = report["calibration"]
    lines.append(
        f"  calibration: ECE {format_metric(calibration['ece_before'])} before, {format_metric(calibration['ece_after'])} after "
        f"temperature {calibration['temperature']:.3f}"
    )
    dead = report["dead_cells"]
    auroc = f", AUROC {dead['auroc']:.4f} against dead/debris truth" if dead["auroc"] is not None else ""
    lines.append(f"  dead-cell detector: {dead['n_flagged']:,} of {dead['n_cells']:,} cells flagged "
                 f"({dead['flagged_fraction']:.2%}){auroc}")
    lines.append(f"  report: {html_path}")
    return "\n".join(lines)


def _accuracy_line(title: str, metrics: dict[str, Any]) -> str:
    return (
        f"  {title}: accuracy {format_metric(metrics['accuracy'])}, balanced accuracy {format_metric(metrics['balanced_accuracy'])} "
        f"on {metrics['n_labeled']:,} labeled cells"
    )


def format_class_mix(metrics: dict[str, Any]) -> str:
    """One line for the accuracy at a class mix, with the mix it assumed."""
    mix = ", ".join(f"{name} {share:.2%}" for name, share in metrics["mix"].items())
    return (f"  at class mix ({mix}): accuracy {format_metric(metrics['accuracy'])}, "
            f"balanced accuracy {format_metric(metrics['balanced_accuracy'])}")


def format_metric(value: float | None) -> str:
    """A metric for people: four decimals, or n/a where it is undefined."""
    return "n/a" if value is None else f"{value:.4f}"
