"""The graph that ships in a bundle: raw uint16 cells in, decisions' ingredients out.

Normalization, the prior correction, temperature and the dead-cell score all
live inside this module, so the exported ONNX needs nothing but a byte copy of
the instrument's pixels and every engine computes exactly the same thing.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.bundle import INPUT_NAME, OUTPUT_NAMES, WEIGHTS_FILE, Bundle
from engines.deepflow import DeepFlow, create_deepflow


class DeployedDeepFlow(nn.Module):
    """uint16 [N, C, S, S] -> (probabilities [N, K], embedding [N, D], dead_score [N])."""

    def __init__(self, net: DeepFlow) -> None:
        super().__init__()
        self.net = net
        k, c, d = net.num_classes, net.in_channels, net.embedding_dim
        self.register_buffer("mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("inv_std", torch.ones(1, c, 1, 1))
        self.register_buffer("inv_temperature", torch.ones(()))
        self.register_buffer("whitening", torch.eye(d))
        self.register_buffer("whitened_means", torch.zeros(k, d))

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view_as(self.mean))
        self.inv_std.copy_(1 / torch.as_tensor(std, dtype=torch.float32).view_as(self.inv_std))

    def set_temperature(self, temperature: float) -> None:
        self.inv_temperature.fill_(1.0 / temperature)

    def set_dead_cell_detector(self, means: np.ndarray, whitening: np.ndarray) -> None:
        """Class means [K', D] (K' <= K live classes seen in training) and the whitening matrix."""
        w = torch.as_tensor(whitening, dtype=torch.float32)
        self.whitening.copy_(w)
        self.whitened_means = torch.as_tensor(means, dtype=torch.float32) @ w

    def normalize(self, cells: torch.Tensor) -> torch.Tensor:
        return (cells.to(torch.float32) - self.mean) * self.inv_std

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, embedding = self.net(self.normalize(cells))
        probabilities = torch.softmax(logits * self.inv_temperature, dim=1)
        z = embedding @ self.whitening
        centers = self.whitened_means
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ centers.T + (centers * centers).sum(1)
        dead_score = torch.sqrt(torch.clamp(d2.min(dim=1).values, min=0.0))
        return probabilities, embedding, dead_score


def build_deployed(architecture: dict) -> DeployedDeepFlow:
    """An untrained module with the bundle's architecture, ready for ``load_state_dict``."""
    net = create_deepflow(
        num_classes=architecture["num_classes"],
        in_channels=architecture["in_channels"],
        input_size=architecture["input_size"],
        width=architecture["width"],
    )
    module = DeployedDeepFlow(net)
    module.whitened_means = torch.zeros(architecture["dead_cell_classes"], net.embedding_dim)
    return module


def load_deployed(bundle: Bundle) -> DeployedDeepFlow:
    """The exact module that was exported to the bundle's ONNX, rebuilt from its weights."""
    saved = torch.load(bundle.file(WEIGHTS_FILE), map_location="cpu", weights_only=True)
    module = build_deployed(saved["architecture"])
    module.load_state_dict(saved["state_dict"])
    return module.eval()


def export_onnx(module: DeployedDeepFlow, path: Path) -> None:
    """Export with a dynamic batch axis; the input stays uint16."""
    net = module.net
    example = torch.zeros(2, net.in_channels, net.input_size, net.input_size, dtype=torch.uint16)
    module.eval()
    # The exporter warns about optional torchvision ops and pytree internals that do not concern this graph.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
