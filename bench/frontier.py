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

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from flowsort.errors import UserError

PAPER_MIX = "Interphase=31550,Prophase=606,Metaphase=68,Anaphase=15,Telophase=27"
DEFAULT_BATCHES = (1, 8, 32, 64)
DEAD_CELLS = 2000


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from trainer.class_mix import parse_class_mix

    parser = subparsers.add_parser(
        "frontier",
        help="accuracy on held-out cells against engine and end-to-end speed, for a teacher and its students",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("teacher", type=Path, help="the full-width bundle")
    parser.add_argument("dataset", type=Path, help="the labeled dataset every model was trained on")
    parser.add_argument("--students", type=Path, nargs="*", default=[], metavar="BUNDLE", help="student bundles")
    parser.add_argument("--class-mix", type=parse_class_mix, default=parse_class_mix(PAPER_MIX), metavar="CLASS=N,...",
                        help="the second class mix to score at (default the paper's)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCHES)), metavar="N,N",
                        help=f"engine batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--seconds", type=float, default=2.0, help="engine timing per batch size (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for OpenVINO (default: all)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end sweep through `flowsort serve`")
    parser.add_argument("--e2e-seconds", type=float, default=4.0, help="seconds per end-to-end level (default 4)")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/bench/frontier"), help="output folder")
    parser.set_defaults(run=run)


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
    from engines.base import predict_all
    from trainer.evaluation import dead_cell_metrics
    from trainer.synthetic import generate

    cells = generate(DEAD_CELLS, seed=4242, size=bundle.input_size, prior="jurkat", dead_fraction=0.1, debris_fraction=0.1)
    outputs = predict_all(engine, cells.images)
    return dead_cell_metrics(outputs.dead_score, bundle, cells.dead | cells.debris)["auroc"]


def measure_model(bundle: Any, images: np.ndarray, labels: np.ndarray, mix: dict[str, float],
                  args: argparse.Namespace, sizes: tuple[int, ...], tick: Any) -> list[dict[str, Any]]:
    """One row per precision: accuracy at both mixes, engine speed, dead-cell AUROC."""
    import engines
    from bench.engine_bench import bench_engine
    from engines.base import predict_all
    from trainer.class_mix import ClassMix

    rows = []
    timing_cells = np.ascontiguousarray(np.resize(images, (max(sizes), *images.shape[1:])))
    for precision in engines.precisions("openvino", bundle):
        try:
            engine = engines.load(bundle, "openvino", precision, max_batch=max(sizes), threads=args.threads)
        except UserError as exc:  # e.g. INT8 rejected by its guard: the frontier says why and goes on
            rows.append({"model": str(bundle.path), "precision": precision, "unavailable": str(exc)})
            continue
        with engine:
            probabilities = predict_all(engine, images).probabilities
            speed = bench_engine(engine, timing_cells, sizes, args.seconds, tick)
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
    from bench import e2e

    parser = argparse.ArgumentParser()
    e2e.add_parser(parser.add_subparsers())
    levels = ",".join(str(int(start_rate * f)) for f in (0.25, 0.5, 0.75))
    args = parser.parse_args(["e2e", str(bundle_path), "--engines", "openvino", "--levels", levels,
                              "--seconds", str(seconds), "--target-rate", "0", "-o", str(out)])
    e2e.run(args)
    report = json.loads((out / "e2e.json").read_text())["engines"][0]
    return {"precision": report["precision"], "max_sustained_cells_per_s": report["max_sustained_cells_per_s"]}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bench.engine_bench import batch_sizes, machine
    from engines.bundle import load_bundle
    from trainer.evaluation import model_labels

    sizes = batch_sizes(args.batch_sizes)
    if args.seconds <= 0 or args.e2e_seconds <= 0:
        raise UserError("--seconds and --e2e-seconds must be positive")
    bundles = [load_bundle(args.teacher), *(load_bundle(path) for path in args.students)]
    dataset, held_out = held_out_cells(bundles, args.dataset)
    images = np.ascontiguousarray(dataset.images[held_out])
    labels = model_labels(bundles[0], dataset.subset(held_out))
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(bundles) * 3 * len(sizes), unit="point", desc="frontier") as progress:
        for bundle in bundles:
            model_rows = measure_model(bundle, images, labels, args.class_mix, args, sizes, progress.update)
            if not args.skip_e2e:
                fastest = max((r["engine_b1_cells_per_s"] or 0 for r in model_rows if "accuracy" in r), default=0)
                e2e = end_to_end(bundle.path, args.out / "e2e" / bundle.path.name, args.e2e_seconds, fastest)
                for row in model_rows:
                    if row.get("precision") == e2e["precision"]:
                        row["e2e_max_sustained_cells_per_s"] = e2e["max_sustained_cells_per_s"]
            rows += model_rows
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "teacher": str(args.teacher), "dataset": str(args.dataset), "machine": machine(),
        "held_out": {**bundles[0].manifest["held_out"], "class_counts": dict(zip(
            dataset.class_names, np.bincount(labels, minlength=len(dataset.class_names)).tolist()))},
        "class_mix": args.class_mix, "settings": {"batch_sizes": list(sizes), "seconds": args.seconds,
                                                  "threads": args.threads, "e2e": not args.skip_e2e,
                                                  "e2e_seconds": args.e2e_seconds},
        "results": rows,
    }
    (args.out / "frontier.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "frontier.png")
    print(table(rows))
    print(f"written {args.out / 'frontier.json'} and {args.out / 'frontier.png'}")
    return 0


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
