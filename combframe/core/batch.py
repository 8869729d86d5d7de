r"""Batches of poses and of compounds: collation, segment layout and the batched result.

A batch of ``C`` compounds with ``N_c`` poses each is run as one flat list of
``M = \sum_c N_c`` poses, cut into chunks of ``chunk_size`` poses that may span compounds.
``index[i]`` is the compound of pose ``i``; the combination reduces per compound with the
segment operations of :mod:`combframe.segment`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor

from combframe.core.tree import flatten, init_fields, pyg_batch, same_mapping
from combframe.errors import CombinationError

__all__ = [
    "CompoundPredictions",
    "Segments",
    "default_collate",
    "dtype_clash",
]


@final
@dataclass(frozen=True, eq=False)
class CompoundPredictions:
    """What :meth:`combframe.MultiPoseModel.forward_compounds` returns.

    Unpacks as ``combined, per_pose, index = model.forward_compounds(compounds)``.

    Attributes
    ----------
    combined
        One combined prediction per compound, shape ``(C,)`` (``(C, d)``: vector outputs).
    per_pose
        The per-pose predictions of all compounds, flat, shape ``(M,)`` (or ``(M, d)``).
    index
        The compound of each pose, shape ``(M,)`` (``torch.long``), sorted.
    prior
        The log prior weight of each pose the call was given (``prior=``, ``-inf`` for a
        pose ``mask=`` leaves out), shape ``(M,)``; ``None`` without either.
        :meth:`combframe.MultiPoseModel.pose_weights` reads it, so ``model.pose_weights(out)``
        weighs the poses as the forward did.
    """

    combined: Tensor
    per_pose: Tensor
    index: Tensor
    prior: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.combined, self.per_pose, self.index))


@final
@dataclass(frozen=True)
class Segments:
    """Where each compound's poses lie in the flat list of ``M`` poses.

    Attributes
    ----------
    sizes
        Number of poses of each compound.
    starts
        Flat position of each compound's first pose.
    owner
        Compound of each flat pose, as Python ints (for chunk bookkeeping without a
        device sync).
    index
        ``owner`` as a ``torch.long`` tensor on the model's device.
    start_index
        ``starts`` as a ``torch.long`` tensor on the model's device.
    prior
        The log prior weight of each pose, ``(M,)`` (``-inf`` for a masked pose), or
        ``None`` (see :func:`combframe.pose_weights`).
    """

    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    owner: tuple[int, ...]
    index: Tensor
    start_index: Tensor
    prior: Tensor | None = None

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], device: torch.device) -> Segments:
        """Lay out compounds of the given sizes one after another."""
        starts, owner, pos = [], [], 0
        for c, n in enumerate(sizes):
            starts.append(pos)
            owner.extend([c] * n)
            pos += n
        both = torch.tensor([*owner, *starts], dtype=torch.long).to(device, non_blocking=True)
        index, start_index = both.split([len(owner), len(starts)])
        return cls(tuple(sizes), tuple(starts), tuple(owner), index, start_index)

    @property
    def count(self) -> int:
        """The number of compounds ``C``."""
        return len(self.sizes)


def dtype_clash(
    batch: Any, params: Sequence[Tensor], what: str, exc: Exception
) -> CombinationError | None:
    """Return the error for a model that raised ``exc`` on poses of another dtype.

    Another dtype than its ``params``; None when the floating tensors of ``batch`` are
    all of the parameters' dtypes (the model's error is then about something else).
    Poses are never cast.
    """
    poses = {t.dtype for t in flatten(batch)[0] if t.is_floating_point()}
    wanted = {t.dtype for t in params}
    if not poses or not wanted or poses <= wanted:
        return None
    have, want = ("/".join(sorted(map(str, d))) for d in (poses, wanted))
    return CombinationError(
        f"the model raised on {what}, whose tensors are {have} while its parameters are "
        f"{want} ({exc}); the model does not cast its input: cast the poses to the "
        f"parameters' dtype (pose.to({want})) or the model to the poses' (model.to({have}))"
    )


def collated_alone(pose: Any) -> bool:
    """Whether a pose is collated even when it runs alone: PyTorch Geometric data.

    A PyG model then sees a ``Batch`` (with ``batch`` and ``num_graphs``) at every chunk
    size. Any other pose that runs alone is passed as it is (a tensor model gets the
    tensor itself at ``chunk_size=1``, as it always has).
    """
    return pyg_batch(pose) is not None


def default_collate(poses: Sequence[Any]) -> Any:
    """Build one batch from a list of poses (the default ``collate`` of chunked runs).

    * tensors of one shape are stacked along a new first dimension;
    * mappings, named tuples, tuples, lists and dataclasses are collated field by field;
    * PyTorch Geometric ``Data`` / ``HeteroData`` become a ``Batch``
      (``Batch.from_data_list``), when torch_geometric is installed;
    * Python numbers become a tensor; anything else is passed on as a list.

    Raises
    ------
    CombinationError
        If tensors differ in shape, or containers in keys or length. Poses of different
        sizes (graphs with different atom counts) need a ``collate`` that concatenates
        them, for instance along atoms with a batch vector.
    """
    first = poses[0]
    if isinstance(first, Tensor):
        return _stack(poses, first)
    pyg = pyg_batch(first)
    if pyg is not None:
        return pyg.from_data_list(list(poses))
    if isinstance(first, Mapping):
        return _collate_mappings(poses, first)
    if isinstance(first, list | tuple):
        return _collate_sequences(poses, first)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return _collate_dataclasses(poses, first)
    if isinstance(first, bool | int | float):
        return torch.tensor(list(poses))
    return list(poses)


def _stack(poses: Sequence[Any], first: Tensor) -> Tensor:
    for k, p in enumerate(poses):
        if not isinstance(p, Tensor) or p.shape != first.shape:
            got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise CombinationError(
                f"the default collate stacks pose tensors of one shape, but pose 0 of the "
                f"chunk has {tuple(first.shape)} and pose {k} has {got}. For poses of "
                "different sizes pass collate= to MultiPoseModel (for graphs: "
                "concatenate the atoms and return a batch vector), or use chunk_size=1"
            )
    return torch.stack(list(poses))


def _collate_mappings(poses: Sequence[Any], first: Mapping[Any, Any]) -> Any:
    keys = list(first)
    for k, p in enumerate(poses):
        if not isinstance(p, Mapping) or list(p) != keys:
            raise CombinationError(
                f"the default collate needs every pose to have the keys {keys}; pose {k} "
                f"of the chunk has {list(p) if isinstance(p, Mapping) else type(p).__name__}"
            )
    return same_mapping(first, {key: default_collate([p[key] for p in poses]) for key in keys})


def _collate_sequences(poses: Sequence[Any], first: list[Any] | tuple[Any, ...]) -> Any:
    for k, p in enumerate(poses):
        if type(p) is not type(first) or len(p) != len(first):
            raise CombinationError(
                f"the default collate needs every pose to be a {type(first).__name__} of "
                f"length {len(first)}; pose {k} of the chunk is {type(p).__name__} of "
                f"length {len(p) if isinstance(p, Sized) else '?'}"
            )
    fields = [default_collate(list(column)) for column in zip(*poses, strict=True)]
    if hasattr(first, "_fields"):  # a named tuple
        return type(first)(*fields)
    return type(first)(fields)


def _collate_dataclasses(poses: Sequence[Any], first: Any) -> Any:
    for k, p in enumerate(poses):
        if type(p) is not type(first):
            raise CombinationError(
                f"the default collate needs every pose to be a {type(first).__name__}; "
                f"pose {k} of the chunk is {type(p).__name__}"
            )
    fields = {
        f.name: default_collate([getattr(p, f.name) for p in poses]) for f in init_fields(first)
    }
    return type(first)(**fields)
