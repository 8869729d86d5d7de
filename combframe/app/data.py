r"""A built-in, deterministic synthetic multi-pose dataset.

Each compound has a latent descriptor :math:`c \in \mathbb{R}^F`; its poses are
:math:`x_i = c + \sigma \varepsilon_i` with :math:`\varepsilon_i \sim \mathcal{N}(0, I)`.
A fixed random *teacher* network :math:`g` (drawn from the seed) gives every pose a
free energy :math:`g(x_i)` in kcal/mol, and the compound's value is set by its best pose,

.. math::

    \Delta G = \min_i g(x_i) + \eta, \qquad \eta \sim \mathcal{N}(0, \text{noise}^2).

A single-pose model combined with a smooth minimum can represent this exactly; the mean
of the per-pose predictions cannot, which is what ``combframe train --compare`` shows.
Everything is generated from ``seed`` with a private :class:`torch.Generator`, so the
same arguments give bit-identical data on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Compound", "SyntheticDataset", "make_dataset"]


@dataclass(frozen=True)
class Compound:
    """One compound: its poses and its compound-level value.

    Attributes
    ----------
    poses
        Shape ``(N, 1, F)``: N poses, each a ``(1, F)`` row that a single-pose model maps
        to one prediction.
    target
        0-d tensor, the compound's free energy (the best pose's, plus noise).
    pose_energies
        Shape ``(N,)``, the teacher's free energy of every pose (for inspection only).
    """

    poses: Tensor
    target: Tensor
    pose_energies: Tensor


@dataclass(frozen=True)
class SyntheticDataset:
    """Compounds split into a training and a held-out part.

    Attributes
    ----------
    train, test
        The two splits; ``test`` is never seen during training.
    features
        Number of features F of a pose.
    """

    train: tuple[Compound, ...]
    test: tuple[Compound, ...]
    features: int


def _teacher(features: int, hidden: int, gen: torch.Generator) -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5))
    return net


def make_dataset(
    *,
    n_compounds: int = 240,
    poses_per_compound: int = 8,
    features: int = 8,
    pose_spread: float = 1.0,
    noise: float = 0.1,
    test_fraction: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SyntheticDataset:
    r"""Generate the synthetic dataset described in the module docstring.

    Parameters
    ----------
    n_compounds
        Number of compounds in both splits together.
    poses_per_compound
        Poses N of every compound.
    features
        Features F of a pose.
    pose_spread
        :math:`\sigma`, how far a compound's poses lie from its descriptor.
    noise
        Standard deviation of the label noise, kcal/mol.
    test_fraction
        Share of compounds held out; at least one compound lands in each split.
    seed
        Seed of the private generator; the data depend on nothing else.
    dtype
        Floating dtype of poses and targets.

    Returns
    -------
    SyntheticDataset
        The two splits.

    Raises
    ------
    ValueError
        If a count is below its minimum or ``test_fraction`` is outside ``(0, 1)``.
    """
    if n_compounds < 2:
        raise ValueError(f"n_compounds must be at least 2 (one per split); got {n_compounds}")
    if poses_per_compound < 1:
        raise ValueError(f"poses_per_compound must be at least 1; got {poses_per_compound}")
    if features < 1:
        raise ValueError(f"features must be at least 1; got {features}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1; got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    teacher = _teacher(features, 16, gen)
    centers = torch.randn((n_compounds, 1, features), generator=gen, dtype=torch.float64)
    offsets = torch.randn(
        (n_compounds, poses_per_compound, features), generator=gen, dtype=torch.float64
    )
    poses = (centers + pose_spread * offsets).float()
    with torch.no_grad():
        energies = -8.0 + 3.0 * teacher(poses).squeeze(-1)
    targets = energies.amin(dim=1) + noise * torch.randn(n_compounds, generator=gen)
    n_test = min(max(1, round(test_fraction * n_compounds)), n_compounds - 1)
    compounds = tuple(
        Compound(
            poses=poses[c].unsqueeze(1).to(dtype),
            target=targets[c].to(dtype),
            pose_energies=energies[c].to(dtype),
        )
        for c in range(n_compounds)
    )
    return SyntheticDataset(train=compounds[n_test:], test=compounds[:n_test], features=features)
