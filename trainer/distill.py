"""Knowledge distillation: a width-scaled DeepFlow student taught by one or more trained bundles.

Loss per cell (Hinton et al. 2015)::

    alpha * CE(student, label) + (1 - alpha) * T^2 * KL(teacher_T || student_T) + beta * (1 - cos(P s, t))

* Soft targets are computed once per cell, before training, as the teachers'
  probabilities at temperature T averaged over the teachers (an ensemble, e.g.
  the cross-validation fold models) and over the eight 90-degree rotations and
  mirrors of the cell. The student still sees the trainer's augmentations
  (any-angle rotation, mirror, shift, intensity jitter); the teachers' view
  average is the rotation-invariant answer it should give for every one of them,
  and the teachers' cost is paid once instead of on every step.
* Balanced sampling shifts the class prior the student sees, exactly as in
  :func:`trainer.train.fit`: the teachers' logits (posteriors under the real
  prior) are moved to the sampling prior before the softmax, and ``fit`` adds
  the prior correction back to the student's classifier at the end.
* Embedding matching (``beta``) regresses a linear projection of the student's
  embedding onto the first teacher's by cosine distance, so the student's space
  keeps the teacher's cluster structure that the dead-cell detector and
  downstream analysis rely on. The projection is dropped after training.
* Unlabeled cells (a dataset's cells without labels, or simulated cells) join
  the training cells labeled by the teachers: the hard-label term uses the
  teachers' argmax for them, and balancing counts them in that class.

The student is packaged by :func:`trainer.package.write_bundle` like any trained
model (calibrated, its own dead-cell detector on its own embedding, ONNX with
normalization inside); bundle.json gains a ``distillation`` section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engines.bundle import Bundle, load_bundle
from engines.deepflow import DeepFlowOutput, create_deepflow
from flowsort.errors import UserError
from trainer.dataset import CellDataset, content_hash
from engines.deployed_model import DeployedDeepFlow, load_deployed
from trainer.predictions import check_compatible
from trainer.package import write_bundle
from trainer.train import TrainConfig, autocast, batches, fit, load_batch, pick_device, resolve_precision, sampling_weights

TEACHER_VIEWS = (1, 8)
MANIFEST_KEY = "distillation"


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.3  # weight of the hard labels; 1 - alpha on the soft targets
    beta: float = 0.0  # weight of the embedding matching (cosine distance)
    teacher_views: int = 8  # 8: average the teachers over the 90-degree rotations and mirrors

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.beta < 0:
            raise UserError(f"--beta must be >= 0, got {self.beta}")
        if self.teacher_views not in TEACHER_VIEWS:
            raise UserError(f"--teacher-views must be 1 or 8, got {self.teacher_views}")


def check_teachers(teachers: list[Bundle], dataset: CellDataset) -> None:
    """All teachers speak the dataset's classes, channels and input size."""
    if not teachers:
        raise UserError("distillation needs at least one teacher bundle")
    for teacher in teachers:
        check_compatible(teacher, dataset)
        if tuple(teacher.class_names) != tuple(dataset.class_names):
            raise UserError(
                f"teacher {teacher.path} predicts {', '.join(teacher.class_names)} but the dataset's classes are "
                f"{', '.join(dataset.class_names)}: give the --merge the teacher was trained with"
            )


def dihedral_views(x: torch.Tensor, views: int) -> list[torch.Tensor]:
    """The cell itself, or its 4 rotations by 90 degrees, each also mirrored."""
    if views == 1:
        return [x]
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(3,)) for r in rotations]


@torch.no_grad()
def teacher_outputs(module: DeployedDeepFlow, images: np.ndarray, views: int, description: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (real prior, before calibration) and embeddings, averaged over the views."""
    device = next(module.parameters()).device
    precision = resolve_precision("auto", device)
    module.eval()
    logits, embedding = [], []
    index = np.arange(len(images))
    for part in tqdm(batches(index, 256), desc=description, unit="batch", dynamic_ncols=True, disable=None):
        x = module.normalize(load_batch(images, part, device))
        outs = []
        for view in dihedral_views(x, views):
            with autocast(device, precision):
                outs.append(module.net(view))
        logits.append(torch.stack([o.logits.float() for o in outs]).mean(0).cpu().numpy())
        embedding.append(torch.stack([o.embedding.float() for o in outs]).mean(0).cpu().numpy())
    return np.concatenate(logits), np.concatenate(embedding)


class DistillationLoss(torch.nn.Module):
    """The mixed objective for :func:`trainer.train.fit`, holding the per-cell teacher targets."""

    def __init__(self, targets: np.ndarray, teacher_embedding: np.ndarray | None, student_dim: int,
                 config: DistillConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("targets", torch.from_numpy(targets.astype(np.float32)))  # [N, K] at T, sampling prior
        if teacher_embedding is not None:
            self.register_buffer("teacher_embedding", torch.from_numpy(teacher_embedding.astype(np.float32)))
            self.projection = torch.nn.Linear(student_dim, teacher_embedding.shape[1])
        else:
            self.teacher_embedding = None
            self.projection = None

    def forward(self, output: DeepFlowOutput, part: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
        config = self.config
        logits = output.logits.float()
        index = torch.from_numpy(part).to(logits.device)
        soft = self.targets[index]
        kl = F.kl_div(F.log_softmax(logits / config.temperature, dim=1), soft, reduction="batchmean")
        loss = config.alpha * F.cross_entropy(logits, labels) + (1 - config.alpha) * config.temperature**2 * kl
        if self.projection is not None and config.beta > 0:
            projected = self.projection(output.embedding.float())
            cosine = F.cosine_similarity(projected, self.teacher_embedding[index], dim=1)
            loss = loss + config.beta * (1 - cosine).mean()
        return loss


def with_extra_cells(dataset: CellDataset, extra: np.ndarray) -> CellDataset:
    """``dataset`` followed by the uint16 cells ``extra`` (labels filled in later), all in memory."""
    if not len(extra):
        return dataset
    if extra.shape[1:] != dataset.images.shape[1:] or extra.dtype != np.uint16:
        raise UserError(
            f"the unlabeled cells are {extra.dtype} {list(extra.shape[1:])} but the dataset's are uint16 "
            f"{list(dataset.images.shape[1:])}: import them with the same channels and size"
        )
    n = len(extra)
    return replace(
        dataset,
        images=np.concatenate([np.asarray(dataset.images), extra]),
        labels=np.concatenate([dataset.labels, np.full(n, -1, dataset.labels.dtype)]),
        object_ids=np.concatenate([dataset.object_ids, -1 - np.arange(n, dtype=np.int64)]),
        truth={key: np.concatenate([values, np.zeros(n, values.dtype)]) for key, values in dataset.truth.items()},
    )


def distill(
    teacher_paths: list[Path],
    dataset: CellDataset,
    train_index: np.ndarray,
    validation_index: np.ndarray,
    out: Path,
    config: TrainConfig,
    distillation: DistillConfig,
    extra_cells: np.ndarray | None = None,
    extra_sources: list[str] | None = None,
    dead_quantile: float = 0.99,
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Distill the teachers into a student of ``config.width`` and write its bundle to ``out``.

    ``train_index`` / ``validation_index`` index labeled cells of ``dataset``
    (validation: early stopping, calibration, dead-cell threshold); ``extra_cells``
    are unlabeled uint16 cells that the teachers label for training only.
    """
    teachers = [load_bundle(path) for path in teacher_paths]
    check_teachers(teachers, dataset)
    extra_cells = np.zeros((0, *dataset.images.shape[1:]), np.uint16) if extra_cells is None else extra_cells
    combined = with_extra_cells(dataset, extra_cells)
    extra_index = np.arange(len(dataset), len(combined))
    taught = np.concatenate([train_index, extra_index])

    device = pick_device()
    per_teacher = []
    first_embedding = None
    for k, teacher in enumerate(teachers):
        module = load_deployed(teacher).to(device)
        logits, embedding = teacher_outputs(module, combined.images[taught], distillation.teacher_views,
                                            f"teacher {k + 1}/{len(teachers)}")
        per_teacher.append(logits)
        if first_embedding is None:
            first_embedding = embedding
    teacher_logits = np.stack(per_teacher)  # [T, n_taught, K]
    ensemble_class = torch.softmax(torch.from_numpy(teacher_logits), dim=2).mean(0).argmax(1).numpy()
    labels = combined.labels.copy()
    labels[extra_index] = ensemble_class[len(train_index):]
    combined = replace(combined, labels=labels)

    num_classes = len(dataset.class_names)
    _, correction = sampling_weights(labels[taught].astype(np.int64), num_classes, config.balance)
    sampling_logits = torch.from_numpy(teacher_logits - correction)
    soft = torch.softmax(sampling_logits / distillation.temperature, dim=2).mean(0).numpy()
    targets = np.zeros((len(combined), num_classes), np.float32)
    targets[taught] = soft
    teacher_embedding = None
    if distillation.beta > 0:
        teacher_embedding = np.zeros((len(combined), first_embedding.shape[1]), np.float32)
        teacher_embedding[taught] = first_embedding
    torch.manual_seed(config.seed)
    student_dim = create_deepflow(num_classes, len(dataset.channels), dataset.input_size, config.width).embedding_dim
    objective = DistillationLoss(targets, teacher_embedding, student_dim, distillation)
    fitted = fit(combined, taught, validation_index, config, description=f"student width {config.width}",
                 objective=objective)

    record = {
        **asdict(distillation),
        "teachers": [{"path": str(t.path), "content_hash": t.content_hash, "width": t.manifest["model"]["width"]}
                     for t in teachers],
        "dataset_hash": content_hash(dataset),
        "labeled_cells": int(len(train_index)),
        "unlabeled_cells": int(len(extra_index)),
        "unlabeled_sources": list(extra_sources or []),
    }
    return write_bundle(out, fitted, combined, train_index, validation_index, config, dead_quantile,
                        extra_manifest={**(extra_manifest or {}), MANIFEST_KEY: record})
