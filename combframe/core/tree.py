"""A pose's tensors, flat, and the pose rebuilt around other tensors.

A pose is any nesting of tensors, PyG data, dataclasses, mappings, named tuples, lists
and tuples. :func:`flatten` walks it once into its tensors (the leaves) and a function
that rebuilds it around others: the runner substitutes stand-ins for the pose tensors
that require grad, and tensors moved to the model's device, without walking it again.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Generic, TypeVar, final

from torch import Tensor

__all__ = ["Rebuild", "flatten", "init_fields", "pyg_batch", "same_mapping"]

_K = TypeVar("_K")
#: Rebuilds a pose around other tensors, given in the order :func:`flatten` found its own.
Rebuild = Callable[[Sequence[Tensor]], Any]


def flatten(obj: Any) -> tuple[list[Tensor], Rebuild]:
    """Return the tensors in ``obj`` and a function that rebuilds ``obj`` around others.

    ``obj`` is walked once, as :mod:`torch.utils._pytree` flattens a tree: tensors are
    the leaves; PyG ``Data`` / ``HeteroData`` / ``Batch`` (the values of their stores),
    dataclasses (every field), mappings, named tuples, lists and tuples are looked into;
    anything else is kept as it is. ``rebuild(leaves)`` returns ``obj`` with its ``k``-th
    tensor replaced by ``leaves[k]``, and leaves ``obj`` untouched: containers of the same
    type (a PyG object or a mutable mapping as a shallow copy, so that a ``defaultdict``
    keeps its factory; an immutable mapping from its items; a dataclass by
    :func:`dataclasses.replace`, so a field its constructor does not take is computed
    again by it, and that field's leaf is not used), sharing every part that holds no
    tensor. A tensor held twice is two leaves.

    :mod:`torch.utils._pytree` itself does not serve: it is private, PyG data,
    dataclasses and mappings other than ``dict`` are leaves to it unless registered in
    its process-wide registry (a change every other user of it would see), and every
    non-container is a leaf it returns.
    """
    leaves: list[Tensor] = []
    node = _flatten(obj, leaves)
    return leaves, _Keep(obj) if node is None else node


def _flatten(obj: Any, leaves: list[Tensor]) -> _Node | None:
    """Append the tensors in ``obj`` to ``leaves``; how to rebuild it (None: it holds none)."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return _TENSOR
    if pyg_batch(obj) is not None:
        stores = [
            (s, got) for s, store in enumerate(obj.stores) if (got := _parts(store.items(), leaves))
        ]
        return _PyG(obj, stores) if stores else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
        parts = _parts(fields, leaves)
        return _Dataclass(obj, parts) if parts else None
    if isinstance(obj, Mapping):
        parts = _parts(obj.items(), leaves)
        return _Mapping(obj, parts) if parts else None
    if isinstance(obj, list | tuple):
        places = _parts(enumerate(obj), leaves)
        return _Sequence(obj, places) if places else None
    return None


def _parts(items: Iterable[tuple[_K, Any]], leaves: list[Tensor]) -> list[tuple[_K, _Node]]:
    """Flatten each value in turn; the key and node of each that holds tensors."""
    parts: list[tuple[_K, _Node]] = []
    for key, value in items:
        if isinstance(value, Tensor):  # the common leaf, without a call
            leaves.append(value)
            parts.append((key, _TENSOR))
        elif (node := _flatten(value, leaves)) is not None:
            parts.append((key, node))
    return parts


class _Node:
    """How to rebuild a part of a pose from its leaves (see :func:`flatten`)."""

    __slots__ = ()

    def __call__(self, leaves: Sequence[Tensor]) -> Any:
        return self.build(iter(leaves))

    def build(self, leaves: Iterator[Tensor]) -> Any:
        """Return the part, rebuilt from the next of ``leaves``."""
        raise NotImplementedError


@final
class _Tensor(_Node):
    __slots__ = ()

    def build(self, leaves: Iterator[Tensor]) -> Any:
        return next(leaves)


_TENSOR = _Tensor()


@final
class _Keep(_Node):
    """An object that holds no tensor: rebuilt as itself."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def build(self, leaves: Iterator[Tensor]) -> Any:
        return self.obj


class _Container(Generic[_K], _Node):
    """A container, and the key and node of each part of it that holds tensors."""

    __slots__ = ("obj", "parts")

    def __init__(self, obj: Any, parts: list[tuple[_K, Any]]) -> None:
        self.obj, self.parts = obj, parts

    def rebuilt(self, leaves: Iterator[Tensor]) -> list[tuple[_K, Any]]:
        """Each part that holds tensors, rebuilt from the next of ``leaves``, by key."""
        return [(key, node.build(leaves)) for key, node in self.parts]


@final
class _Sequence(_Container[int]):
    def build(self, leaves: Iterator[Tensor]) -> Any:
        values = list(self.obj)
        for k, value in self.rebuilt(leaves):
            values[k] = value
        if hasattr(self.obj, "_fields"):  # a named tuple
            return type(self.obj)(*values)
        return type(self.obj)(values)


@final
class _Mapping(_Container[Any]):
    def build(self, leaves: Iterator[Tensor]) -> Any:
        return same_mapping(self.obj, dict(self.rebuilt(leaves)))


@final
class _Dataclass(_Container[str]):
    """A dataclass: fields its constructor does not take it computes again."""

    def build(self, leaves: Iterator[Tensor]) -> Any:
        init = _init_names(self.obj.__class__)
        return dataclasses.replace(self.obj, **{k: v for k, v in self.rebuilt(leaves) if k in init})


@final
class _PyG(_Container[int]):
    """PyG data: the parts of each of its stores (by position) that hold tensors."""

    def build(self, leaves: Iterator[Tensor]) -> Any:
        out = copy.copy(self.obj)  # a shallow copy: the pose itself is left alone
        stores = out.stores
        for s, parts in self.parts:
            for key, node in parts:
                stores[s][key] = node.build(leaves)
        return out


def same_mapping(like: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    """Return a mapping of ``like``'s type holding ``like``'s items updated by ``items``.

    A shallow copy keeps what the constructor would lose (a ``defaultdict``'s factory, an
    ``OrderedDict``'s order); an immutable mapping is rebuilt from the items (a plain
    ``dict`` when its type cannot be built from one).
    """
    if isinstance(like, MutableMapping):
        out = copy.copy(like)
        out.update(items)
        return out
    items = {**like, **items}
    try:
        return type(like)(items)  # type: ignore[call-arg]  # a Mapping's own constructor
    except TypeError:
        return items


def init_fields(obj: Any) -> list[dataclasses.Field[Any]]:
    """Return the fields of a dataclass (or its type) that its constructor takes."""
    return [f for f in dataclasses.fields(obj) if f.init]


@functools.cache
def _init_names(cls: type) -> frozenset[str]:
    """Return the names of the fields a dataclass's constructor takes."""
    return frozenset(f.name for f in init_fields(cls))


def pyg_batch(first: Any) -> Any:
    """PyTorch Geometric's ``Batch`` class when ``first`` is one of its data objects."""
    data = sys.modules.get("torch_geometric.data")
    if data is not None and isinstance(first, data.Data | data.HeteroData):
        return data.Batch
    return None
