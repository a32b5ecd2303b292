"""The models of `flowsort bench frontier`: bundles grouped into models, one bundle per cross-validation fold.

A frontier compares models, not bundles: the teachers (one bundle per fold) form
the teacher model, and the students group by width and recipe: distilled or
trained on the labels only, right-angle or any-angle rotation, final model on
every cell or early-stopped on a validation split. Every bundle must hold out a fold of the
same split of the same dataset (``--hold-out K/N``), each model one bundle per
fold, and every student model exactly the teacher's folds, so that each model's
pooled accuracy is a cross-validation accuracy over the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.bundle import VALIDATION_SEEN_KEY
from flowsort.errors import UserError
from trainer.holdout import MANIFEST_KEY

SPLIT_KEYS = ("folds", "split_seed", "dataset_hash")


@dataclass(frozen=True)
class FoldModel:
    """One model of the frontier: its label and, per held-out fold in fold order, its bundles: one, or the members
    of an ensemble whose probabilities are averaged."""

    label: str
    members: tuple[tuple[Any, ...], ...]

    @property
    def bundles(self) -> tuple[Any, ...]:
        """Each fold's first bundle (all of them, for a model that is not an ensemble)."""
        return tuple(members[0] for members in self.members)

    @property
    def folds(self) -> tuple[int, ...]:
        return tuple(fold_of(bundle) for bundle in self.bundles)

    @property
    def width(self) -> float:
        return width_of(self.bundles[0])

    def paths(self) -> list[str]:
        return [str(bundle.path) for members in self.members for bundle in members]


def fold_of(bundle: Any) -> int:
    return int(bundle.manifest[MANIFEST_KEY]["fold"])


def width_of(bundle: Any) -> float:
    return float(bundle.manifest["model"]["width"])


def recipe_of(bundle: Any) -> tuple[str, ...]:
    """What sets a bundle's training apart, in words: how it learned, and the non-default recipe choices."""
    parts = ["distilled" if "distillation" in bundle.manifest else "labels only"]
    if bundle.manifest.get("training", {}).get("augmentation", {}).get("rotation", "any") != "any":
        parts.append(f"{bundle.manifest['training']['augmentation']['rotation']} rotation")
    if bundle.manifest.get("provenance", {}).get(VALIDATION_SEEN_KEY):
        parts.append("final on all cells")
    return tuple(parts)


def frontier_models(teachers: list[Any], students: list[Any], ensembles: list[Any] = ()) -> list[FoldModel]:
    """The teacher model first, then one model per student width and recipe (:func:`recipe_of`), in the order given,
    then one ensemble per width and recipe of ``ensembles``."""
    check_same_split([*teachers, *students, *ensembles])
    kinds = sorted({(width_of(bundle), recipe_of(bundle)[1:]) for bundle in teachers})
    if len(kinds) > 1:
        raise UserError("the teachers differ in width or recipe (" + "; ".join(
            f"{b.path}: w{width_of(b):g} {', '.join(recipe_of(b))}" for b in teachers)
            + "): give one bundle per fold of the same teacher model")
    width, extras = kinds[0]
    teacher = fold_model(", ".join([f"w{width:g} teacher", *extras]), teachers)
    groups: dict[tuple[float, tuple[str, ...]], list[Any]] = {}
    for bundle in students:
        groups.setdefault((width_of(bundle), recipe_of(bundle)), []).append(bundle)
    models = [teacher]
    for (width, recipe), bundles in groups.items():
        model = fold_model(f"w{width:g} {', '.join(recipe)}", bundles)
        check_covers(model, teacher)
        models.append(model)
    groups = {}
    for bundle in ensembles:
        groups.setdefault((width_of(bundle), recipe_of(bundle)), []).append(bundle)
    for (width, recipe), bundles in groups.items():
        model = ensemble_model(f"w{width:g} {', '.join(recipe)}", bundles)
        check_covers(model, teacher)
        models.append(model)
    return models


def check_same_split(bundles: list[Any]) -> None:
    """Refuse bundles without a held-out fold, and bundles whose folds come from different splits or datasets."""
    for bundle in bundles:
        if MANIFEST_KEY not in bundle.manifest:
            raise UserError(f"{bundle.path} records no held-out fold: train it with --hold-out K/N, like the others")
    splits = [tuple(bundle.manifest[MANIFEST_KEY][key] for key in SPLIT_KEYS) for bundle in bundles]
    if len(set(splits)) > 1:
        raise UserError("the models held out different cells: " + "; ".join(
            f"{bundle.path}: fold {fold_of(bundle)}/{folds} (split seed {seed}) of dataset {dataset_hash[:12]}"
            for bundle, (folds, seed, dataset_hash) in zip(bundles, splits)))


def fold_model(label: str, bundles: list[Any]) -> FoldModel:
    """``bundles`` as one model, refusing two bundles that hold out the same fold."""
    by_fold: dict[int, Any] = {}
    for bundle in bundles:
        fold = fold_of(bundle)
        if fold in by_fold:
            raise UserError(f"{by_fold[fold].path} and {bundle.path} ({label}) both hold out fold {fold}: "
                            "give one bundle per fold of each model")
        by_fold[fold] = bundle
    return FoldModel(label, tuple((by_fold[fold],) for fold in sorted(by_fold)))


def ensemble_model(label: str, bundles: list[Any]) -> FoldModel:
    """``bundles`` as one ensemble: those holding out the same fold are that fold's members, as many on each fold."""
    by_fold: dict[int, list[Any]] = {}
    for bundle in bundles:
        by_fold.setdefault(fold_of(bundle), []).append(bundle)
    counts = {fold: len(members) for fold, members in sorted(by_fold.items())}
    if len(set(counts.values())) > 1 or min(counts.values()) < 2:
        raise UserError(f"an ensemble ({label}) needs two or more bundles on each fold, as many on every fold; got "
                        + ", ".join(f"{count} on fold {fold}" for fold, count in counts.items()))
    size = next(iter(counts.values()))
    return FoldModel(f"{label}, ensemble of {size}", tuple(tuple(by_fold[fold]) for fold in sorted(by_fold)))


def check_covers(model: FoldModel, teacher: FoldModel) -> None:
    """Refuse a student model that does not hold out exactly the teacher's folds, naming the folds that differ."""
    missing = sorted(set(teacher.folds) - set(model.folds))
    extra = sorted(set(model.folds) - set(teacher.folds))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"no bundle holds out fold {', '.join(map(str, missing))}, which the teacher does")
        if extra:
            problems.append(f"fold {', '.join(map(str, extra))} has no teacher bundle")
        raise UserError(f"{model.label} ({', '.join(model.paths())}) must hold out the teacher's folds "
                        f"({', '.join(map(str, teacher.folds))}): {'; '.join(problems)}")
