"""Shared fixtures: float64 models, poses, and CUDA skipping."""

from __future__ import annotations

import pytest
import torch

from combframe.testing import random_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_mlp(features: int = 5, hidden: int = 16, seed: int = 0) -> torch.nn.Module:
    """A small float64 single-pose model returning one element per pose."""
    return random_model(seed, features, hidden)


def make_poses(n: int, features: int = 5, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7919)
    return [torch.randn((1, features), generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.fixture
def mlp() -> torch.nn.Module:
    return make_mlp()
