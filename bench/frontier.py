"""`flowsort bench frontier TEACHER [TEACHER ...] DATASET --students S ...`: accuracy against speed.

The bundles are grouped into models (:mod:`bench.frontier_models`): one teacher
bundle per cross-validation fold (``--hold-out K/N`` when trained), students
of any widths and recipes covering the same folds, and ensembles (several
bundles per fold, their probabilities averaged).
For each model and each precision the OpenVINO engine can run for every one of its
bundles (INT8 only where a bundle holds a guard-approved model):

* 5-class accuracy on held-out cells: each bundle predicts the cells of its own
  fold and the predictions of all folds are pooled, which is the model's
  cross-validation accuracy (with the per-fold accuracies, and the difference to
  the teacher's at fp32 in points), at this sample's class mix and at another mix
  (``--class-mix``, default the paper's), the probabilities re-weighted by
  Bayes' rule as the streamer's ``sample_prior`` does;
* engine cells/s at batch 1 and at the best batch (``bench engines``' timing) and
  the dead/debris AUROC of the dead-cell score on simulated cells (float
  precisions), on the model's first bundle: its folds share the architecture;
* end-to-end max sustained cells/s through ``flowsort serve`` (``bench e2e``'s
  sweep, at the precision the streamer picks), unless ``--skip-e2e`` (not for
  ensembles: the streamer serves one bundle).

Writes ``frontier.json`` and ``frontier.png`` (accuracy against cells/s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flowsort.errors import UserError

if TYPE_CHECKING:
    from bench.frontier_models import FoldModel

PAPER_MIX = "Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27"
DEFAULT_BATCHES = (1, 8, 32, 64)
DEAD_CELLS = 2000
REFERENCE_PRECISION = "fp32"


@dataclass(frozen=True)
class FrontierSettings:
    """What `flowsort bench frontier` measures and where it writes."""

    teachers: tuple[Path, ...]
    dataset: Path
    students: tuple[Path, ...] = ()
    ensembles: tuple[Path, ...] = ()
    class_mix: dict[str, float] | None = None  # None: the paper's
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES
    seconds: float = 2.0
    threads: int | None = None
    skip_e2e: bool = False
    e2e_seconds: float = 4.0
    out: Path = Path("runs/bench/frontier")


@dataclass(frozen=True)
class FoldCells:
    """The held-out cells of one fold, with their labels as indices into the models' classes."""

    images: np.ndarray
    labels: np.ndarray


def held_out_cells(models: list[FoldModel], dataset_path: Path) -> tuple[Any, dict[int, FoldCells]]:
    """The dataset (with the teacher's merges) and, per fold the models hold out, its held-out cells."""
    from trainer.dataset import read_dataset
    from trainer.evaluation import model_labels
    from trainer.holdout import HeldOutFold, as_held_out

    teacher = models[0].bundles[0]
    try:
        dataset, split = as_held_out(read_dataset(dataset_path), teacher.manifest)
    except UserError as exc:
        raise UserError(f"{dataset_path}: {exc}") from None
    for bundle in (bundle for model in models for bundle in model.bundles):
        if tuple(bundle.class_names) != tuple(dataset.class_names):
            raise UserError(f"{bundle.path} predicts {', '.join(bundle.class_names)}, the teacher "
                            f"{', '.join(dataset.class_names)}: compare models of the same classes")
    cells = {}
    for fold in models[0].folds:
        index = HeldOutFold(fold, split.folds, split.split_seed).split(dataset)[1]
        cells[fold] = FoldCells(np.ascontiguousarray(dataset.images[index]),
                                model_labels(teacher, dataset.subset(index)))
    return dataset, cells


def dead_cell_auroc(engine: Any, bundle: Any) -> float | None:
    """AUROC of the dead score, dead cells and debris against live ones, on fresh simulated cells."""
    from bench.cell_sources import synthetic_cells
    from engines.base import predict_all
    from trainer.evaluation import dead_cell_metrics

    cells = synthetic_cells(DEAD_CELLS, bundle.input_size, seed=4242, dead_fraction=0.1, debris_fraction=0.1)
    assert cells.truth is not None and cells.truth.dead is not None and cells.truth.debris is not None
    outputs = predict_all(engine, cells.images)
    return dead_cell_metrics(outputs.dead_score, bundle, cells.truth.dead | cells.truth.debris)["auroc"]


def measure_model(model: FoldModel, cells: dict[int, FoldCells], mix: dict[str, float],
                  settings: FrontierSettings, tick: Any) -> list[dict[str, Any]]:
    """One row per precision: pooled accuracy at both mixes, engine speed, dead-cell AUROC."""
    import engines
    from trainer.class_mix import ClassMix

    mixes = [ClassMix.of(bundle.class_names, mix, bundle.class_prior) for bundle in model.bundles]
    runnable = [set.intersection(*(set(engines.precisions("openvino", bundle)) for bundle in members))
                for members in model.members]
    rows = []
    for precision in dict.fromkeys(p for members in model.members for p in engines.precisions("openvino", members[0])):
        row = {"label": model.label, "bundles": model.paths(), "folds": list(model.folds), "precision": precision}
        lacking = [fold for fold, can in zip(model.folds, runnable) if precision not in can]
        if lacking:  # INT8 exists only where the bundle holds a guard-approved model
            rows.append({**row, "unavailable": f"fold {', '.join(map(str, lacking))} cannot run {precision} here"})
            continue
        rows.append({**row, **measure_precision(model, precision, cells, mixes, settings, tick)})
    return rows


def measure_precision(model: FoldModel, precision: str, cells: dict[int, FoldCells], mixes: list[Any],
                      settings: FrontierSettings, tick: Any) -> dict[str, Any]:
    """Every fold's bundle (or ensemble, probabilities averaged) predicts its own fold's cells, pooled; speed on the
    first fold's bundles (an ensemble's members run one after another), AUROC on a single bundle's dead score.

    ``mixes``: the ``--class-mix`` for each fold, from its (first) bundle's own training mix.
    """
    import engines
    from bench.engine_bench import bench_engine
    from engines.base import predict_all

    sizes = settings.batch_sizes
    first = cells[model.folds[0]].images
    timing_cells = np.ascontiguousarray(np.resize(first, (max(sizes), *first.shape[1:])))
    hits, decided, member_speeds = [], [], []
    auroc = None
    for members, fold, fold_mix in zip(model.members, model.folds, mixes):
        probabilities: Any = 0.0
        for bundle in members:
            try:
                engine = engines.load(bundle, "openvino", precision, max_batch=max(sizes), threads=settings.threads)
            except UserError as exc:  # e.g. INT8 rejected by its guard: the frontier says why and goes on
                return {"unavailable": f"{bundle.path}: {exc}"}
            with engine:
                probabilities = probabilities + predict_all(engine, cells[fold].images).probabilities / len(members)
                if members is model.members[0]:
                    member_speeds.append(bench_engine(engine, timing_cells, sizes, settings.seconds, tick))
                    if len(members) == 1 and precision in ("fp32", "bf16"):
                        auroc = dead_cell_auroc(engine, bundle)
        hits.append(probabilities.argmax(1) == cells[fold].labels)
        decided.append(fold_mix.decide(probabilities))  # each fold's model from its own training mix
    at_mix = mixes[0].score(
        np.concatenate(decided), np.concatenate([cells[fold].labels for fold in model.folds]))
    speed = one_after_another(member_speeds)
    best = max(speed, key=lambda row: row["throughput_cells_per_s"])
    return {
        "width": model.width,
        "members": len(model.members[0]),
        "distilled_from": list(dict.fromkeys(teacher["content_hash"][:12] for members in model.members
                                             for bundle in members
                                             for teacher in bundle.manifest.get("distillation", {}).get("teachers", []))),
        "accuracy": float(np.concatenate(hits).mean()),
        "accuracy_folds": [float(fold_hits.mean()) for fold_hits in hits],
        "accuracy_at_mix": at_mix["accuracy"],
        "engine_b1_cells_per_s": speed[0]["throughput_cells_per_s"] if speed[0]["batch"] == 1 else None,
        "engine_best_cells_per_s": best["throughput_cells_per_s"], "engine_best_batch": best["batch"],
        "dead_auroc_synthetic": auroc, "engine_rows": speed,
    }


def one_after_another(member_speeds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Engine rows of an ensemble from its members' rows at the same batch sizes: each cell passes through every
    member in turn, so the times per cell add up (one member: its own rows)."""
    if len(member_speeds) == 1:
        return member_speeds[0]
    return [{"batch": rows[0]["batch"], "members": len(rows),
             "throughput_cells_per_s": 1 / sum(1 / row["throughput_cells_per_s"] for row in rows)}
            for rows in zip(*member_speeds)]


def end_to_end(bundle_path: Path, out: Path, seconds: float, start_rate: float) -> dict[str, Any]:
    """`bench e2e`'s sweep for one model, starting near its engine speed; the sustained rate it found."""
    from bench.e2e import SweepSettings, sweep_engines

    levels = ",".join(str(int(start_rate * f)) for f in (0.25, 0.5, 0.75))
    report = sweep_engines(SweepSettings(bundle=bundle_path, engines="openvino", levels=levels, seconds=seconds,
                                         target_rate=0, out=out))["engines"][0]
    return {"precision": report["precision"], "max_sustained_cells_per_s": report["max_sustained_cells_per_s"]}


def measure_frontier(settings: FrontierSettings) -> dict[str, Any]:
    """Measure every model, write frontier.json and frontier.png to ``settings.out``, print the table."""
    from tqdm import tqdm

    from bench.frontier_models import frontier_models
    from bench.run_summary import describe_machine
    from engines.bundle import load_bundle
    from trainer.class_mix import parse_class_mix

    if settings.seconds <= 0 or settings.e2e_seconds <= 0:
        raise UserError("--seconds and --e2e-seconds must be positive")
    if not settings.teachers:
        raise UserError("give at least one teacher bundle")
    mix = settings.class_mix if settings.class_mix is not None else parse_class_mix(PAPER_MIX)
    models = frontier_models([load_bundle(path) for path in settings.teachers],
                             [load_bundle(path) for path in settings.students],
                             [load_bundle(path) for path in settings.ensembles])
    dataset, cells = held_out_cells(models, settings.dataset)
    rows: list[dict[str, Any]] = []
    points = sum(len(model.members[0]) for model in models) * 3 * len(settings.batch_sizes)
    with tqdm(total=points, unit="point", desc="frontier") as progress:
        for model in models:
            model_rows = measure_model(model, cells, mix, settings, progress.update)
            if not settings.skip_e2e and len(model.members[0]) == 1:  # an ensemble is not one bundle to serve
                fastest = max((r["engine_b1_cells_per_s"] or 0 for r in model_rows if "accuracy" in r), default=0)
                e2e = end_to_end(model.bundles[0].path, settings.out / "e2e" / model.label.replace(" ", "-"),
                                 settings.e2e_seconds, fastest)
                for row in model_rows:
                    if row.get("precision") == e2e["precision"]:
                        row["e2e_max_sustained_cells_per_s"] = e2e["max_sustained_cells_per_s"]
            rows += model_rows
    add_delta_vs_teacher(rows, models[0].label)
    labels = np.concatenate([fold.labels for fold in cells.values()])
    split = models[0].bundles[0].manifest["held_out"]
    settings.out.mkdir(parents=True, exist_ok=True)
    report = {
        "teachers": [str(path) for path in settings.teachers], "dataset": str(settings.dataset),
        "machine": describe_machine(),
        "held_out": {"folds": split["folds"], "split_seed": split["split_seed"], "dataset_hash": split["dataset_hash"],
                     "folds_used": list(cells), "n_cells": int(len(labels)), "class_counts": dict(zip(
                         dataset.class_names, np.bincount(labels[labels >= 0], minlength=len(dataset.class_names)).tolist()))},
        "class_mix": mix, "settings": {"batch_sizes": list(settings.batch_sizes), "seconds": settings.seconds,
                                       "threads": settings.threads, "e2e": not settings.skip_e2e,
                                       "e2e_seconds": settings.e2e_seconds},
        "results": rows,
    }
    (settings.out / "frontier.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, settings.out / "frontier.png")
    print(table(rows))
    print(f"written {settings.out / 'frontier.json'} and {settings.out / 'frontier.png'}")
    return report


def add_delta_vs_teacher(rows: list[dict[str, Any]], teacher_label: str) -> None:
    """Each measured row's accuracy minus the teacher model's at the float reference precision, in points."""
    reference = next((row["accuracy"] for row in rows if row["label"] == teacher_label
                      and row["precision"] == REFERENCE_PRECISION and "accuracy" in row), None)
    for row in rows:
        if "accuracy" in row:
            row["delta_vs_teacher"] = None if reference is None else 100 * (row["accuracy"] - reference)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against engine cells/s, one point per model and precision, at both class mixes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "accuracy" in row]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "accuracy", "this sample's class mix"), (axes[1], "accuracy_at_mix", "the --class-mix (default the paper's)")):
        for precision, marker in (("fp32", "o"), ("bf16", "s"), ("int8", "^")):
            points = [row for row in measured if row["precision"] == precision]
            ax.scatter([r["engine_best_cells_per_s"] for r in points], [100 * r[key] for r in points], marker=marker,
                       label=precision)
            for row in points:
                ax.annotate(row["label"], (row["engine_best_cells_per_s"], 100 * row[key]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log" if measured else "linear", xlabel="engine cells/s (best batch)", ylabel="accuracy on held-out cells (%)", title=title)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # after the scale, which resets it
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def accuracy_text(row: dict[str, Any]) -> str:
    """Pooled accuracy, with the folds' standard deviation where there are several, e.g. ``88.7% ± 1.2``."""
    folds = np.array(row["accuracy_folds"])
    spread = f" ± {100 * folds.std(ddof=1):.1f}" if len(folds) > 1 else ""
    return f"{100 * row['accuracy']:.2f}%{spread}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | folds | precision | accuracy (± folds' SD) | vs teacher | at the other mix | engine b1 | "
             "engine best (batch) | e2e sustained | dead AUROC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        folds = ",".join(map(str, row["folds"]))
        if "accuracy" not in row:
            lines.append(f"| {row['label']} | {folds} | {row['precision']} | unavailable: {row['unavailable']} | | | | | | |")
            continue
        e2e, b1, auroc = row.get("e2e_max_sustained_cells_per_s"), row["engine_b1_cells_per_s"], row["dead_auroc_synthetic"]
        delta = row["delta_vs_teacher"]
        lines.append(
            f"| {row['label']} | {folds} | {row['precision']} | {accuracy_text(row)} | "
            f"{'-' if delta is None else f'{delta:+.2f} pt'} | {100 * row['accuracy_at_mix']:.2f}% | "
            f"{'-' if b1 is None else f'{b1:,.0f}'} | {row['engine_best_cells_per_s']:,.0f} ({row['engine_best_batch']}) | "
            f"{'-' if e2e is None else f'{e2e:,.0f}'} | {'-' if auroc is None else f'{auroc:.3f}'} |")
    return "\n".join(lines)
