"""Training DeepFlow: SGD as in the paper, with a warmup + cosine schedule, balanced sampling and early stopping.

Choices and why:

* SGD, momentum 0.9, weight decay 5e-4, batch 128: the paper's.
* Learning rate: linear warmup for ``warmup_epochs`` then cosine decay to zero,
  instead of the paper's late x0.1 step. It needs no hand-picked decay epoch,
  suits runs of any length, and the warmup keeps the first steps of a fresh
  BN network stable at a peak rate higher than the paper's 0.01.
* Class imbalance: each epoch samples cells with weight ``n_class ** -alpha``
  (``balance="sqrt"``: alpha 0.5). Rare mitotic stages are seen far more often
  than their share without the few Anaphase cells being repeated hundreds of
  times per epoch. Because sampling shifts the class prior the network learns,
  the classifier bias is corrected by ``log(prior / sampling share)`` (logit
  adjustment), so shipped probabilities are posteriors under the real prior.
* Early stopping on a validation metric, keeping the best epoch's weights.
* bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX), AMP on CUDA.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from tqdm import tqdm

from engines.deepflow import create_deepflow
from engines.deployed_model import DeployedDeepFlow
from flowsort.errors import UserError
from trainer.augment import Augmentation, augment
from trainer.dataset import CellDataset

MONITORS = ("balanced_accuracy", "accuracy", "loss")
BALANCE_EXPONENT = {"none": 0.0, "sqrt": 0.5, "full": 1.0}


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    width: float = 1.0
    balance: str = "sqrt"
    monitor: str = "balanced_accuracy"
    patience: int = 10
    seed: int = 0
    precision: str = "auto"
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_EXPONENT:
            raise UserError(f"balance must be one of {', '.join(BALANCE_EXPONENT)}, got {self.balance!r}")
        if self.monitor not in MONITORS:
            raise UserError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise UserError("epochs must be >= 1 and batch size >= 2")


@dataclass
class FitResult:
    module: DeployedDeepFlow
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, float]
    precision: str


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on CPUs with native bf16, fp16 AMP on CUDA (bf16 where supported), else fp32."""
    if device.type == "cuda":
        if requested in ("auto", "amp"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if requested == "auto":
        return "bf16" if native_bf16 else "fp32"
    if requested == "bf16" and not native_bf16:
        raise UserError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); use fp32")
    if requested == "fp16":
        raise UserError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return requested


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation); every class with >= 2 cells keeps at least one on each side."""
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        n_val = int(round(len(members) * fraction))
        n_val = min(max(n_val, 1 if len(members) >= 2 else 0), len(members) - 1)
        validation.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(validation, dtype=np.int64))


def channel_statistics(images: np.ndarray, index: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training cells (chunked: images may be memory-mapped)."""
    total = np.zeros(images.shape[1])
    total_sq = np.zeros(images.shape[1])
    count = 0
    for start in range(0, len(index), chunk):
        block = images[np.sort(index[start : start + chunk])].astype(np.float64)
        total += block.sum(axis=(0, 2, 3))
        total_sq += (block**2).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    return mean.astype(np.float32), std.astype(np.float32)


def sampling_weights(labels: np.ndarray, num_classes: int, balance: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell sampling weights and the resulting per-class logit correction."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    exponent = BALANCE_EXPONENT[balance]
    per_class = np.where(counts > 0, np.maximum(counts, 1) ** -exponent, 0.0)
    weights = per_class[labels]
    prior = counts / counts.sum()
    share = counts * per_class / (counts * per_class).sum()
    with np.errstate(divide="ignore"):
        correction = np.where(counts > 0, np.log(prior) - np.log(share), 0.0)
    return weights / weights.sum(), correction.astype(np.float32)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(index: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [index[i : i + batch_size] for i in range(0, len(index), batch_size)]


def load_batch(images: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint16 cells as float32 on ``device`` (normalization happens inside the module)."""
    return torch.from_numpy(np.asarray(images[index], dtype=np.float32)).to(device, non_blocking=True)


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def logits_and_embedding(
    module: DeployedDeepFlow, images: np.ndarray, index: np.ndarray, batch_size: int = 256, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (uncalibrated) logits and embeddings of the cells at ``index``, in eval mode."""
    device = next(module.parameters()).device
    module.eval()
    logits, embedding = [], []
    for part in batches(index, batch_size):
        with autocast(device, precision):
            out = module.net(module.normalize(load_batch(images, part, device)))
        logits.append(out.logits.float().cpu().numpy())
        embedding.append(out.embedding.float().cpu().numpy())
    dim = module.net.embedding_dim
    if not logits:
        return np.zeros((0, module.net.num_classes), np.float32), np.zeros((0, dim), np.float32)
    return np.concatenate(logits), np.concatenate(embedding)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predicted = logits.argmax(axis=1)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels.astype(np.int64))).item()
    return {
        "loss": float(loss),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
    }


def is_better(metrics: dict[str, float], best: dict[str, float] | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "loss":
        return metrics["loss"] < best["loss"]
    return (metrics[monitor], -metrics["loss"]) > (best[monitor], -best["loss"])


@dataclass
class Progress:
    """Where training stands: each epoch's metrics and the best epoch so far (what a checkpoint keeps)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    best_state: dict[str, Any] | None = None
    best_epoch: int = -1
    next_epoch: int = 0


def fit(
    dataset: CellDataset,
    train_index: np.ndarray,
    validation_index: np.ndarray,
    config: TrainConfig,
    checkpoint: Path | None = None,
    resume: bool = False,
    description: str = "train",
    objective: torch.nn.Module | None = None,
) -> FitResult:
    """Train a DeployedDeepFlow on ``train_index``, early-stopping on ``validation_index``.

    ``objective(output, cell_index, labels)`` replaces the cross-entropy loss (distillation);
    its own parameters (e.g. a projection head) are trained alongside the network.
    """
    device = pick_device()
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    labels = dataset.labels.astype(np.int64)
    module = new_module(dataset, train_index, config, device)
    weights, correction = sampling_weights(labels[train_index], len(dataset.class_names), config.balance)
    steps_per_epoch = max(1, len(train_index) // config.batch_size)
    if objective is not None:
        objective.to(device)
    trained = [*module.parameters(), *(objective.parameters() if objective is not None else [])]
    optimizer, scheduler = optimizer_and_schedule(trained, config, steps_per_epoch)
    progress = Progress()
    if resume and checkpoint is not None and checkpoint.is_file():
        progress = load_checkpoint(checkpoint, device, config, module, optimizer, scheduler)

    bar = tqdm(total=(config.epochs - progress.next_epoch) * steps_per_epoch, desc=description, unit="batch",
               dynamic_ncols=True, disable=None)
    for epoch in range(progress.next_epoch, config.epochs):
        if progress.best is not None and epoch - progress.best_epoch > config.patience:
            bar.write(f"{description}: early stop at epoch {epoch}, best epoch {progress.best_epoch + 1}")
            break
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.choice(train_index, size=steps_per_epoch * config.batch_size, replace=True, p=weights)
        loss = train_epoch(module, dataset.images, labels, order, epoch, config, device, precision, optimizer,
                           scheduler, bar, progress.best, objective)
        val_logits, _ = logits_and_embedding(module, dataset.images, validation_index, precision=precision)
        metrics = {"epoch": epoch + 1, "train_loss": loss, "lr": scheduler.get_last_lr()[0]}
        if len(validation_index):
            metrics.update(validation_metrics(val_logits + correction, labels[validation_index]))
        progress.history.append(metrics)
        bar.write(
            f"{description} epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}"
            + (f", val loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f} bal.acc {metrics['balanced_accuracy']:.4f}" if len(validation_index) else "")
        )
        if not len(validation_index) or is_better(metrics, progress.best, config.monitor):
            progress.best, progress.best_epoch = metrics, epoch
            progress.best_state = copy.deepcopy(module.state_dict())
        progress.next_epoch = epoch + 1
        if checkpoint is not None:
            save_checkpoint(checkpoint, config, module, optimizer, scheduler, progress)
    bar.close()
    return best_model(module, progress, correction, device, precision)


def new_module(dataset: CellDataset, train_index: np.ndarray, config: TrainConfig, device: torch.device) -> DeployedDeepFlow:
    """An untrained DeepFlow for the dataset, normalized by the training cells' channel statistics."""
    net = create_deepflow(len(dataset.class_names), in_channels=len(dataset.channels), input_size=dataset.input_size,
                          width=config.width)
    module = DeployedDeepFlow(net)
    module.set_normalization(*channel_statistics(dataset.images, train_index))
    module.to(device)
    if device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


def optimizer_and_schedule(
    trained: list[torch.nn.Parameter], config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Nesterov SGD over ``trained`` with a linear warmup and a cosine decay over all steps."""
    optimizer = torch.optim.SGD(
        trained, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(step, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch),
    )
    return optimizer, scheduler


def train_epoch(
    module: DeployedDeepFlow, images: np.ndarray, labels: np.ndarray, order: np.ndarray, epoch: int,
    config: TrainConfig, device: torch.device, precision: str, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR, bar: Any, best: dict[str, float] | None,
    objective: torch.nn.Module | None = None,
) -> float:
    """One pass over ``order`` in batches, augmented; returns the mean training loss
    (cross-entropy, or ``objective`` where :func:`fit` was given one)."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    module.train()
    running = 0.0
    steps = 0
    for step, part in enumerate(batches(order, config.batch_size)):
        x = augment(module.normalize(load_batch(images, part, device)), generator, config.augmentation)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[part]).to(device)
        with autocast(device, precision):
            output = module.net(x)
        loss = objective(output, part, y) if objective is not None else F.cross_entropy(output.logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item()
        steps = step + 1
        bar.update()
        bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} loss {running / steps:.3f}" + (f" best {config.monitor} {best[config.monitor]:.4f}" if best and config.monitor in best else ""))
    return running / max(1, steps)


def load_checkpoint(
    checkpoint: Path, device: torch.device, config: TrainConfig, module: DeployedDeepFlow,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> Progress:
    """Restore the module, optimizer and schedule of an interrupted run (``--resume``), and where it stood."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    if state["config"] != asdict(config):
        raise UserError(f"--resume: {checkpoint} was written with different training settings; drop --resume or use the same flags")
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Progress(state["history"], state["best"], state["best_state"], state["best_epoch"], state["epoch"] + 1)


def save_checkpoint(
    checkpoint: Path, config: TrainConfig, module: DeployedDeepFlow, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR, progress: Progress,
) -> None:
    """Everything ``--resume`` needs, replaced atomically after each epoch."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": progress.next_epoch - 1, "config": asdict(config), "module": module.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "history": progress.history, "best": progress.best, "best_state": progress.best_state,
        "best_epoch": progress.best_epoch,
    }
    torch.save(state, checkpoint.with_suffix(".tmp"))
    os.replace(checkpoint.with_suffix(".tmp"), checkpoint)


def best_model(
    module: DeployedDeepFlow, progress: Progress, correction: np.ndarray, device: torch.device, precision: str
) -> FitResult:
    """The best epoch's weights, with the sampling correction folded into the classifier's bias."""
    assert progress.best_state is not None
    module.load_state_dict(progress.best_state)
    module.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        module.net.classifier.bias += torch.from_numpy(correction).to(device)
    return FitResult(module=module, history=progress.history, best_epoch=progress.best_epoch + 1,
                     best_metrics=dict(progress.best or {}), precision=precision)
