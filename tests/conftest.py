"""Shared fixtures: float64 models, poses, CUDA skipping, and the project's own plugins."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import combframe.registry
from combframe.registry.plugins import dist_of, entry_points
from combframe.testing import random_model

#: Distributions with combframe plugins installed beside the project when the session
#: started (a user's own plugin, the plugin guide's example). The tests count and list
#: combinations, so they see only the project's plugins and those a test installs.
FOREIGN = frozenset(
    name for name in (dist_of(ep)[0] for ep in entry_points()) if name not in (None, "combframe")
)


def _own_entry_points() -> list[importlib.metadata.EntryPoint]:
    return [ep for ep in entry_points() if dist_of(ep)[0] not in FOREIGN]


if FOREIGN:
    # for the whole session, collection included (tests parametrized over the installed
    # combinations): every registry is built from the project's and the tests' plugins
    combframe.registry.entry_points = _own_entry_points  # type: ignore[attr-defined]  # patched on purpose
    combframe.registry.current_registry().invalidate()


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


def torchrun_train(*settings: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``combframe train *settings`` as two gloo processes under torchrun; assert exit 0."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*torchrun, "-m", "combframe", "train", *settings],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
