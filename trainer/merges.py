"""Label merges: `--merge G1,S_phase,G2=Interphase` turns the 7 stages into the paper's 5 classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flowsort.errors import UserError
from trainer.dataset import UNLABELED, CellDataset


def parse_merge(spec: str) -> tuple[tuple[str, ...], str]:
    """``"A,B=C"`` -> ``(("A", "B"), "C")``."""
    members, sep, target = spec.partition("=")
    names = tuple(name.strip() for name in members.split(",") if name.strip())
    if not sep or not target.strip() or not names:
        raise UserError(f"--merge {spec!r} is not of the form CLASS,CLASS,...=NEW_NAME (e.g. G1,S_phase,G2=Interphase)")
    return names, target.strip()


def merged_classes(
    class_names: tuple[str, ...], merges: Sequence[str], missing_ok: bool = False
) -> tuple[tuple[str, ...], np.ndarray]:
    """New class names and the old-index -> new-index map.

    A merged class takes the place of its first member, so the stage order is kept.
    ``missing_ok`` merges whichever members are present (a dataset holding some of the classes).
    """
    target_of: dict[str, str] = {}
    for spec in merges:
        members, target = parse_merge(spec)
        for name in members:
            if name not in class_names:
                if missing_ok:
                    continue
                raise UserError(f"--merge {spec!r}: no class {name!r}; the classes are {', '.join(class_names)}")
            if name in target_of:
                raise UserError(f"--merge: class {name!r} is merged twice")
            target_of[name] = target
    new_names: list[str] = []
    for name in class_names:
        new_name = target_of.get(name, name)
        if new_name not in new_names:
            new_names.append(new_name)
    mapping = np.array([new_names.index(target_of.get(name, name)) for name in class_names], dtype=np.int16)
    return tuple(new_names), mapping


def remap_labels(labels: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Apply an old-index -> new-index map, keeping unlabeled cells unlabeled."""
    out = np.full(labels.shape, UNLABELED, dtype=np.int16)
    known = labels != UNLABELED
    out[known] = mapping[labels[known]]
    return out


def apply_merges(dataset: CellDataset, merges: Sequence[str], missing_ok: bool = False) -> CellDataset:
    """The dataset with its classes merged (see :func:`merged_classes`)."""
    if not merges:
        return dataset
    names, mapping = merged_classes(dataset.class_names, merges, missing_ok)
    return CellDataset(
        images=dataset.images,
        labels=remap_labels(dataset.labels, mapping),
        object_ids=dataset.object_ids,
        class_names=names,
        channels=dataset.channels,
        channel_names=dataset.channel_names,
        truth=dataset.truth,
        source=dataset.source,
        summary={**dataset.summary, "merges": list(merges)},
    )
