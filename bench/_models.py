"""The two benchmark models and their poses.

(a) ``pointcloud``: an MLP applied to every atom of a 256-atom x 64-feature point cloud
    and sum-pooled to a scalar; about 196k parameters in 20 tensors. Parameter-heavy: its
    per-pose gradient is large compared with its activations.
(b) ``activations``: a narrow MLP with normalisation and gated activations on a
    2048-atom point cloud; few parameters, many saved activations per pose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class SumPool(nn.Module):
    """Sum over atoms and features: one scalar per pose, (B,) for a stacked batch."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(dim=(-2, -1))


def pointcloud_model(seed: int = 0) -> nn.Module:
    """Model (a): 10 linear layers (20 tensors), width 152, SiLU, ~196k parameters."""
    torch.manual_seed(seed)
    width, features, depth = 152, 64, 10
    layers: list[nn.Module] = [nn.Linear(features, width), nn.SiLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.SiLU()]
    layers += [nn.Linear(width, 1), SumPool()]
    return nn.Sequential(*layers)


class GatedBlock(nn.Module):
    """LayerNorm, linear, SiLU-gated by a sigmoid: several saved activations per atom."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(self.norm(x))
        return x + torch.nn.functional.silu(h) * torch.sigmoid(h)


def activation_model(seed: int = 0) -> nn.Module:
    """Model (b): 32 -> 96 features, three gated blocks, sum-pooled; ~34k parameters."""
    torch.manual_seed(seed)
    width = 96
    return nn.Sequential(
        nn.Linear(32, width),
        GatedBlock(width),
        GatedBlock(width),
        GatedBlock(width),
        nn.Linear(width, 1),
        SumPool(),
    )


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: how to build it and the shape of one pose."""

    key: str
    label: str
    build: Callable[[int], nn.Module]
    atoms: int
    features: int

    def poses(
        self, n: int, device: torch.device, seed: int = 0, atoms: int | None = None
    ) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        shape = (atoms or self.atoms, self.features)
        return [0.1 * torch.randn(shape, generator=gen).to(device) for _ in range(n)]


MODELS: dict[str, BenchModel] = {
    "pointcloud": BenchModel(
        "pointcloud", "(a) point-cloud MLP, 256 atoms x 64 features", pointcloud_model, 256, 64
    ),
    "activations": BenchModel(
        "activations", "(b) activation-heavy, 2048 atoms x 32 features", activation_model, 2048, 32
    ),
}
