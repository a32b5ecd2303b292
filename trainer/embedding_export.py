"""Per-cell embeddings, probabilities and dead scores of a dataset, for analysis elsewhere (`flowsort embed`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flowsort.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from trainer.predictions import Predictions

FORMATS = (".npz", ".csv", ".parquet")


def export_embeddings(bundle_path: Path, dataset_path: Path, out: Path, label_maps: Sequence[str] = ()) -> int:
    """Run the bundle's model on every cell of the dataset and write ``out`` in the format its suffix names;
    labels the model cannot use are written as unlabeled. Returns the number of cells written."""
    from trainer.evaluation import flagged_dead, load_inputs, model_labels, run_model, unknown_classes

    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"cannot tell the format of {out.name!r}: end -o with .npz, .csv or .parquet")
    if suffix == ".parquet":
        _require_pyarrow()
    bundle, dataset = load_inputs(bundle_path, dataset_path, label_maps)
    labels = model_labels(bundle, dataset, strict=False)
    ignored = unknown_classes(dataset, set(bundle.class_names))
    if ignored:
        print(f"note: cells labeled {', '.join(ignored)} (not classes of the model) are written unlabeled; "
              "--map-labels names the model class they stand for")
    predictions = run_model(bundle, dataset)
    flagged = flagged_dead(predictions.dead_score, bundle)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npz":
        write_npz(out, bundle.class_names, dataset.object_ids, labels, predictions, flagged)
    else:
        columns = table_columns(bundle.class_names, dataset.object_ids, labels, predictions, flagged)
        (write_csv if suffix == ".csv" else write_parquet)(out, columns)
    print(f"wrote {out}: {len(dataset):,} cells, {predictions.embedding.shape[1]}-d embedding, "
          f"{len(bundle.class_names)} class probabilities, {int(flagged.sum()):,} cells flagged dead")
    return len(dataset)


def write_npz(
    path: Path, class_names: tuple[str, ...], object_ids: np.ndarray, labels: np.ndarray, predictions: Predictions,
    flagged: np.ndarray,
) -> None:
    """Arrays by name; ``labels`` index ``class_names`` (the model's), -1 for unlabeled cells."""
    import numpy as np

    np.savez(
        path,
        object_ids=object_ids,
        labels=labels,
        embedding=predictions.embedding,
        probabilities=predictions.probabilities,
        dead_score=predictions.dead_score,
        dead_flag=flagged,
        class_names=np.array(class_names),
    )


def table_columns(
    class_names: tuple[str, ...], object_ids: np.ndarray, labels: np.ndarray, predictions: Predictions, flagged: np.ndarray
) -> dict[str, np.ndarray]:
    """One column per field for the row formats: names for labels (empty when unlabeled), p_<class>, emb_<i>."""
    import numpy as np

    names = np.array([*class_names, ""])  # label -1 (unlabeled) picks the trailing empty name
    columns = {
        "object_id": object_ids,
        "label": names[labels],
        "predicted": names[predictions.probabilities.argmax(axis=1)],
        **{f"p_{name}": predictions.probabilities[:, k] for k, name in enumerate(class_names)},
        "dead_score": predictions.dead_score,
        "dead_flag": flagged,
    }
    columns.update({f"emb_{i}": predictions.embedding[:, i] for i in range(predictions.embedding.shape[1])})
    return columns


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Floats with 9 significant digits, enough to read float32 values back exactly; flags as 0/1."""
    import csv

    import numpy as np

    def text(values: np.ndarray) -> np.ndarray:
        if values.dtype.kind == "f":
            return np.char.mod("%.9g", values)
        return (values.astype(np.int8) if values.dtype == bool else values).astype(str)

    cells = [text(values) for values in columns.values()]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*cells))


def write_parquet(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise UserError("writing .parquet needs pyarrow (pip install pyarrow); or write .npz or .csv instead") from exc
