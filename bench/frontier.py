"""`flowsort bench frontier TEACHER DATASET --students S ...`: accuracy against speed, per model and precision.

For the teacher and each student, and each precision the OpenVINO engine can
run for it (INT8 only where the bundle holds a guard-approved model):

* 5-class accuracy on the held-out cells that every model left out of training
  (``--hold-out K/N`` when they were trained; models that held out different
  cells, or were trained on another dataset, are refused), at this sample's
  class mix and at another mix (``--class-mix``, default the paper's), the
  probabilities re-weighted by Bayes' rule as the streamer's ``sample_prior`` does;
* engine cells/s at batch 1 and at the best batch (``bench engines``' timing);
* dead/debris AUROC of the dead-cell score on simulated cells (float precision);
* end-to-end max sustained cells/s through ``flowsort serve`` (``bench e2e``'s
  sweep, at the precision the streamer picks), unless ``--skip-e2e``.

Writes ``frontier.json`` and ``frontier.png`` (accuracy against cells/s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowsort.errors import UserError

PAPER_MIX = "Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27"
DEFAULT_BATCHES = (1, 8, 32, 64)
DEAD_CELLS = 2000


@dataclass(frozen=True)
class FrontierSettings:
    """What `flowsort bench frontier` measures and where it writes."""

    teacher: Path
    dataset: Path
    students: tuple[Path, ...] = ()
    class_mix: dict[str, float] | None = None  # None: the paper's
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES
    seconds: float = 2.0
    threads: int | None = None
    skip_e2e: bool = False
    e2e_seconds: float = 4.0
    out: Path = Path("runs/bench/frontier")


def held_out_cells(bundles: list[Any], dataset_path: Path) -> tuple[Any, np.ndarray]:
    """The dataset (with the teacher's merges) and the held-out cells every bundle left out of training."""
    from trainer.dataset import read_dataset
    from trainer.holdout import MANIFEST_KEY, as_held_out

    records = []
    for bundle in bundles:
        record = bundle.manifest.get(MANIFEST_KEY)
        if record is None:
            raise UserError(f"{bundle.path} records no held-out fold: train it with --hold-out K/N, like the others")
        records.append(record)
    if any(r != records[0] for r in records[1:]):
        raise UserError("the models held out different cells: " + "; ".join(
            f"{b.path}: fold {r['fold']}/{r['folds']} of dataset {r['dataset_hash'][:12]}" for b, r in zip(bundles, records)))
    try:
        dataset, fold = as_held_out(read_dataset(dataset_path), bundles[0].manifest)
    except UserError as exc:
        raise UserError(f"{dataset_path}: {exc}") from None
    for bundle in bundles:
        if tuple(bundle.class_names) != tuple(dataset.class_names):
            raise UserError(f"{bundle.path} predicts {', '.join(bundle.class_names)}, the teacher "
                            f"{', '.join(dataset.class_names)}: compare models of the same classes")
    return dataset, fold.split(dataset)[1]


def dead_cell_auroc(engine: Any, bundle: Any) -> float | None:
    """AUROC of the dead score, dead cells and debris against live ones, on fresh simulated cells."""
    from bench.cell_sources import synthetic_cells
    from engines.base import predict_all
    from trainer.evaluation import dead_cell_metrics

    cells = synthetic_cells(DEAD_CELLS, bundle.input_size, seed=4242, dead_fraction=0.1, debris_fraction=0.1)
    assert cells.truth is not None and cells.truth.dead is not None and cells.truth.debris is not None
    outputs = predict_all(engine, cells.images)
    return dead_cell_metrics(outputs.dead_score, bundle, cells.truth.dead | cells.truth.debris)["auroc"]


def measure_model(bundle: Any, images: np.ndarray, labels: np.ndarray, mix: dict[str, float],
                  settings: FrontierSettings, tick: Any) -> list[dict[str, Any]]:
    """One row per precision: accuracy at both mixes, engine speed, dead-cell AUROC."""
    import engines
    from bench.engine_bench import bench_engine
    from engines.base import predict_all
    from trainer.class_mix import ClassMix

    rows = []
    sizes = settings.batch_sizes
    timing_cells = np.ascontiguousarray(np.resize(images, (max(sizes), *images.shape[1:])))
    for precision in engines.precisions("openvino", bundle):
        try:
            engine = engines.load(bundle, "openvino", precision, max_batch=max(sizes), threads=settings.threads)
        except UserError as exc:  # e.g. INT8 rejected by its guard: the frontier says why and goes on
            rows.append({"model": str(bundle.path), "precision": precision, "unavailable": str(exc)})
            continue
        with engine:
            probabilities = predict_all(engine, images).probabilities
            speed = bench_engine(engine, timing_cells, sizes, settings.seconds, tick)
            auroc = dead_cell_auroc(engine, bundle) if precision in ("fp32", "bf16") else None
        best = max(speed, key=lambda row: row["throughput_cells_per_s"])
        at_mix = ClassMix.of(bundle.class_names, mix, bundle.class_prior).metrics(probabilities, labels)
        rows.append({
            "model": str(bundle.path), "width": bundle.manifest["model"]["width"], "precision": precision,
            "distilled_from": [t["content_hash"][:12] for t in bundle.manifest.get("distillation", {}).get("teachers", [])],
            "accuracy": float((probabilities.argmax(1) == labels).mean()),
            "accuracy_at_mix": at_mix["accuracy"],
            "engine_b1_cells_per_s": speed[0]["throughput_cells_per_s"] if speed[0]["batch"] == 1 else None,
            "engine_best_cells_per_s": best["throughput_cells_per_s"], "engine_best_batch": best["batch"],
            "dead_auroc_synthetic": auroc, "engine_rows": speed,
        })
    return rows


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

    from bench.run_summary import describe_machine
    from engines.bundle import load_bundle
    from trainer.class_mix import parse_class_mix
    from trainer.evaluation import model_labels

    if settings.seconds <= 0 or settings.e2e_seconds <= 0:
        raise UserError("--seconds and --e2e-seconds must be positive")
    mix = settings.class_mix if settings.class_mix is not None else parse_class_mix(PAPER_MIX)
    bundles = [load_bundle(settings.teacher), *(load_bundle(path) for path in settings.students)]
    dataset, held_out = held_out_cells(bundles, settings.dataset)
    images = np.ascontiguousarray(dataset.images[held_out])
    labels = model_labels(bundles[0], dataset.subset(held_out))
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(bundles) * 3 * len(settings.batch_sizes), unit="point", desc="frontier") as progress:
        for bundle in bundles:
            model_rows = measure_model(bundle, images, labels, mix, settings, progress.update)
            if not settings.skip_e2e:
                fastest = max((r["engine_b1_cells_per_s"] or 0 for r in model_rows if "accuracy" in r), default=0)
                e2e = end_to_end(bundle.path, settings.out / "e2e" / bundle.path.name, settings.e2e_seconds, fastest)
                for row in model_rows:
                    if row.get("precision") == e2e["precision"]:
                        row["e2e_max_sustained_cells_per_s"] = e2e["max_sustained_cells_per_s"]
            rows += model_rows
    settings.out.mkdir(parents=True, exist_ok=True)
    report = {
        "teacher": str(settings.teacher), "dataset": str(settings.dataset), "machine": describe_machine(),
        "held_out": {**bundles[0].manifest["held_out"], "class_counts": dict(zip(
            dataset.class_names, np.bincount(labels, minlength=len(dataset.class_names)).tolist()))},
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


def label(row: dict[str, Any]) -> str:
    return f"w{row['width']:g} {row['precision']}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
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
                ax.annotate(label(row), (row["engine_best_cells_per_s"], 100 * row[key]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xscale="log", xlabel="engine cells/s (best batch)", ylabel="accuracy on held-out cells (%)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | precision | accuracy | at the other mix | engine b1 | engine best (batch) | e2e sustained | dead AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "accuracy" not in row:
            lines.append(f"| {row['model']} | {row['precision']} | unavailable: {row['unavailable']} | | | | | |")
            continue
        e2e = row.get("e2e_max_sustained_cells_per_s")
        auroc = row["dead_auroc_synthetic"]
        lines.append(
            f"| w{row['width']:g}{' (distilled)' if row['distilled_from'] else ''} | {row['precision']} | "
            f"{100 * row['accuracy']:.2f}% | {100 * row['accuracy_at_mix']:.2f}% | {row['engine_b1_cells_per_s']:,.0f} | "
            f"{row['engine_best_cells_per_s']:,.0f} ({row['engine_best_batch']}) | "
            f"{'-' if e2e is None else f'{e2e:,.0f}'} | {'-' if auroc is None else f'{auroc:.3f}'} |")
    return "\n".join(lines)
