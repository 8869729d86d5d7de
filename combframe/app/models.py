r"""The single-pose networks of ``combframe train``, built by name in one place.

:func:`build_network` is the one function that turns a configuration and a description
of the data (:class:`DataInfo`) into the single-pose network that
:class:`combframe.MultiPoseModel` wraps; training and anything that rebuilds a saved
model call it, so the two always agree. ``model.name`` picks the network:

* ``mlp``: a two-layer perceptron from a pose's feature vector to one value;
* ``schnet``: PyTorch Geometric's SchNet on a pose's atoms (``z``, ``pos``), the
  interaction graph built by :class:`RadiusGraph` in plain torch (``pyg-lib`` and
  ``torch-cluster`` are not needed);
* ``package.module:Class``: a user's own ``torch.nn.Module``, constructed with the
  extra ``model.*`` keys as keyword arguments;
* ``auto`` (the default): ``mlp`` for feature vectors, ``schnet`` for molecules.

Every built-in network starts near the training set's mean value (:attr:`DataInfo.start`),
not at zero, so the first steps do not spend themselves on the offset.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from combframe.app.config import ConfigError, TrainConfig
from combframe.app.readers import import_quietly

__all__ = ["DataInfo", "RadiusGraph", "SchNetNetwork", "build_network", "resolve_model_name"]


@dataclass(frozen=True)
class DataInfo:
    """What a network needs to know about the data it will see.

    Attributes
    ----------
    kind
        ``"vectors"`` (poses are ``(1, F)`` feature rows) or ``"molecules"`` (poses are
        PyTorch Geometric ``Data`` with ``z``, ``pos`` and ``lig``).
    features
        Features F of a pose (vectors), or 0.
    start
        The built-in networks' starting prediction for every pose (about the training
        compounds' mean value): a number, or one per target.
    outputs
        Values per pose: 0 for one (a network returning ``(b,)``), d for d targets (a
        network returning ``(b, d)``, its last layer d wide).
    """

    kind: str
    features: int
    start: float | tuple[float, ...]
    outputs: int = 0


class RadiusGraph(torch.nn.Module):
    r"""The edges between atoms of one graph closer than ``cutoff``, in plain torch.

    For atoms :math:`i \ne j` of the same graph (same ``batch`` entry) with
    :math:`\lVert r_i - r_j \rVert \le` ``cutoff`` it returns the directed edge
    :math:`j \to i` (``edge_index[0]`` the source) and its length. The distances are
    computed per graph on a padded ``(graphs, atoms, atoms)`` block, so the cost grows
    with the square of the largest graph of a batch, not of the whole batch. Edge
    lengths are recomputed from ``pos`` with autograd, so forces could flow through them.
    This is the ``interaction_graph`` SchNet accepts in place of ``radius_graph``.
    """

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``edge_index`` (2, E) and the edge lengths (E,)."""
        counts = torch.bincount(batch)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(len(batch), device=pos.device) - starts[batch]
        width = int(counts.max()) if len(counts) else 0
        with torch.no_grad():
            dense = pos.new_zeros((len(counts), width, 3))
            dense[batch, local] = pos.detach()
            present = torch.zeros((len(counts), width), dtype=torch.bool, device=pos.device)
            present[batch, local] = True
            near = torch.cdist(dense, dense) <= self.cutoff
            near &= present[:, :, None] & present[:, None, :]
            near &= ~torch.eye(width, dtype=torch.bool, device=pos.device)
            graph, dst, src = near.nonzero(as_tuple=True)
        edge_index = torch.stack([starts[graph] + src, starts[graph] + dst])
        length = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=-1)
        return edge_index, length

    def extra_repr(self) -> str:
        """Show the cutoff."""
        return f"cutoff={self.cutoff}"


class SchNetNetwork(torch.nn.Module):
    """SchNet on one pose or a ``Batch`` of poses: one value (or ``outputs``) per pose.

    SchNet's last layer starts at zero, so every pose starts at ``offset`` (a sum over
    atoms of random outputs would start far from the values, and further the larger the
    molecule).

    Parameters
    ----------
    hidden
        SchNet's hidden channels (and filters).
    interactions
        Interaction blocks.
    cutoff
        Interaction radius, in the unit of the coordinates (Å).
    gaussians
        Radial basis functions over ``[0, cutoff]``.
    offset
        Added to every prediction (the training set's mean value; one per target).
    outputs
        0: one value per pose, shape ``(poses,)``; d: d values, ``(poses, d)`` (SchNet's
        last layer is d wide).
    """

    offset: Tensor

    def __init__(
        self,
        hidden: int,
        interactions: int,
        cutoff: float,
        gaussians: int,
        offset: float | tuple[float, ...],
        outputs: int = 0,
    ) -> None:
        super().__init__()
        SchNet = import_quietly("torch_geometric.nn.models").SchNet
        self.schnet = SchNet(
            hidden_channels=hidden,
            num_filters=hidden,
            num_interactions=interactions,
            num_gaussians=gaussians,
            cutoff=cutoff,
            interaction_graph=RadiusGraph(cutoff),
        )
        for block in self.schnet.interactions:
            # ``mlp`` is ``conv.nn`` under a second name; one name per parameter lets the
            # weights be saved as safetensors (the block's forward uses ``conv`` only).
            del block.mlp
        if outputs:
            self.schnet.lin2 = torch.nn.Linear(self.schnet.lin2.in_features, outputs)
        self.outputs = outputs
        with torch.no_grad():  # start every prediction at ``offset``, whatever the atoms
            self.schnet.lin2.weight.zero_()
            self.schnet.lin2.bias.zero_()
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.get_default_dtype()))

    def forward(self, pose: Any) -> Tensor:
        """Predict each pose of ``pose`` (a ``Data`` or a ``Batch``).

        Returns shape ``(poses,)``, or ``(poses, outputs)`` with several outputs.
        """
        batch = getattr(pose, "batch", None)
        out: Tensor = self.schnet(pose.z, pose.pos, batch)
        shape = (-1, self.outputs) if self.outputs else (-1,)
        return out.reshape(shape) + self.offset


def _mlp(
    features: int, hidden: int, offset: float | tuple[float, ...], outputs: int = 0
) -> torch.nn.Module:
    """Build the feature-vector network: an MLP from a pose's features to one value.

    With ``outputs`` d > 0 the last layer is d wide: ``(b, 1, F)`` poses give ``(b, d)``.
    """
    head = torch.nn.Linear(hidden, outputs or 1)
    with torch.no_grad():
        head.bias.copy_(torch.tensor(offset))  # start at the mean target, not at 0 kcal/mol
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.SiLU(),
        head,
        torch.nn.Flatten(0, 1) if outputs else torch.nn.Flatten(0),
    )


def resolve_model_name(name: str, kind: str) -> str:
    """``auto`` becomes ``mlp`` for feature vectors and ``schnet`` for molecules."""
    if name == "auto":
        return "schnet" if kind == "molecules" else "mlp"
    return name


def _import_class(path: str) -> type[torch.nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.name {path!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(
            f"model.name {path!r}: {module_name} has no torch.nn.Module class {attr!r}"
        )
    return cls


def build_network(config: TrainConfig, info: DataInfo) -> torch.nn.Module:
    """Build the single-pose network ``config.model.name`` (see the module docstring).

    The weights are drawn from the global generator: seed it first for reproducible
    starting weights. The network is on the CPU, in float32.

    Raises
    ------
    ConfigError
        If the network does not fit the data (an MLP on molecules, SchNet on vectors),
        the import path cannot be imported, or the class refuses its keyword arguments;
        the message names ``model.name``.
    """
    try:
        return _build(config, info)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build(config: TrainConfig, info: DataInfo) -> torch.nn.Module:
    spec = config.model
    name, extra = spec.name, dict(spec.model_extra or {})
    name = resolve_model_name(name, info.kind)
    if ":" in name:
        cls = _import_class(name)
        try:
            return cls(**extra)
        except TypeError as exc:
            raise ValueError(f"model.name {name!r}: {exc}") from None
    if extra:
        raise ValueError(
            f"model: {sorted(extra)} are not settings of the built-in {name!r} network; "
            "extra model.* keys go to a class named by import path (package.module:Class)"
        )
    wanted = {"mlp": "vectors", "schnet": "molecules"}
    if name not in wanted:
        raise ValueError(
            f"model.name: unknown network {name!r}; use auto, mlp, schnet or an import "
            "path package.module:Class"
        )
    if wanted[name] != info.kind:
        raise ValueError(
            f"model.name: {name!r} takes {wanted[name]}, but the data are {info.kind}; "
            f"use model.name={resolve_model_name('auto', info.kind)} (or auto)"
        )
    if name == "mlp":
        return _mlp(info.features, config.hidden, info.start, info.outputs)
    return SchNetNetwork(
        config.hidden, spec.interactions, spec.cutoff, spec.gaussians, info.start, info.outputs
    )
