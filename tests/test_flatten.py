"""Poses flattened once into their tensors and rebuilt around others.

:func:`combframe.core.tree.flatten` is what the runner walks a pose with (once per
forward); stand-ins and tensors moved to the device go back in through its rebuild.
Hypothesis draws nested containers of every kind a pose may be built from, with tensors
held more than once; the rebuild must give back the same structure, put each new
tensor in exactly one place, and leave the pose itself untouched.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import importlib.util
import operator
import types
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import combframe
from combframe.core.tree import flatten
from combframe.testing import full_graph_gradients, make_loss, multipose_gradients

STRATEGIES = ("store", "recompute", "stream")


@dataclasses.dataclass
class Holder:
    a: Any
    b: Any = None


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: Any


class Pair(NamedTuple):
    a: Any
    b: Any


#: Tensors a drawn pose holds; drawn with repeats, so one tensor may sit in two places.
POOL = [torch.full((2,), float(k)) for k in range(4)]


def _pyg_data(children: list[Any]) -> Any:
    data = pytest.importorskip("torch_geometric.data")
    return data.Data(x=children[0], extra=children[1:])


def _wrap(kind: str, children: list[Any]) -> Any:
    """A container of ``kind`` holding ``children``."""
    one, rest = children[0], children[1:]
    items = {f"k{i}": c for i, c in enumerate(children)}
    build: dict[str, Any] = {
        "list": lambda: list(children),
        "tuple": lambda: tuple(children),
        "dict": lambda: items,
        "ordered": lambda: collections.OrderedDict(items),
        "default": lambda: collections.defaultdict(list, items),
        "proxy": lambda: types.MappingProxyType(items),
        "namedtuple": lambda: Pair(one, rest),
        "dataclass": lambda: Holder(one, rest),
        "frozen": lambda: Frozen(children),
        "pyg": lambda: _pyg_data(children),
    }
    return build[kind]()


KINDS = ["list", "tuple", "dict", "ordered", "default", "proxy", "namedtuple", "dataclass"]
KINDS += ["frozen", *(["pyg"] if importlib.util.find_spec("torch_geometric") else [])]

trees = st.recursive(
    st.sampled_from(POOL) | st.integers() | st.text(max_size=3) | st.none(),
    lambda inner: st.builds(_wrap, st.sampled_from(KINDS), st.lists(inner, min_size=1, max_size=4)),
    max_leaves=12,
)


def _same(got: Any, want: Any) -> None:
    """Assert ``got`` has ``want``'s structure and types, holding the same tensors."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, Tensor):
        assert got is want
    elif hasattr(want, "stores") and hasattr(want, "to_dict"):  # PyG data
        _same(got.to_dict(), want.to_dict())
    elif dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            _same(getattr(got, f.name), getattr(want, f.name))
    elif isinstance(want, collections.abc.Mapping):
        assert list(got) == list(want)
        for key in want:
            _same(got[key], want[key])
        if isinstance(want, collections.defaultdict):
            assert got.default_factory is want.default_factory
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    else:
        assert got == want


@settings(max_examples=300, deadline=None)
@given(trees)
def test_rebuild_of_its_own_leaves_gives_the_pose_back(pose: Any) -> None:
    leaves, rebuild = flatten(pose)
    _same(rebuild(leaves), pose)
    assert all(isinstance(t, Tensor) for t in leaves)


@settings(max_examples=300, deadline=None)
@given(trees)
def test_each_new_leaf_lands_in_exactly_one_place_and_the_pose_is_untouched(pose: Any) -> None:
    leaves, rebuild = flatten(pose)
    _identical(leaves, _every_tensor(pose))
    fresh = [t.clone() for t in leaves]  # distinct even where the pose holds one tensor twice
    rebuilt = rebuild(fresh)
    _identical(_every_tensor(rebuilt), fresh)
    _identical(_every_tensor(pose), leaves)


def _every_tensor(obj: Any) -> list[Tensor]:
    """Every tensor in a drawn pose, in order: the test's own walk, to check flatten's."""
    if isinstance(obj, Tensor):
        return [obj]
    if hasattr(obj, "stores") and hasattr(obj, "to_dict"):  # PyG data
        obj = obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = vars(obj)
    if isinstance(obj, collections.abc.Mapping):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for value in obj for t in _every_tensor(value)]
    return []


def _identical(got: list[Tensor], want: list[Tensor]) -> None:
    assert len(got) == len(want) and all(map(operator.is_, got, want))


def test_a_pose_without_tensors_is_rebuilt_as_itself() -> None:
    pose = {"name": "ligand", "atoms": [1, 2]}
    leaves, rebuild = flatten(pose)
    assert leaves == [] and rebuild([]) is pose


def test_parts_without_tensors_are_shared_not_copied() -> None:
    meta = {"name": "ligand"}
    pose = {"x": torch.ones(1), "meta": meta}
    _, rebuild = flatten(pose)
    out = rebuild([torch.zeros(1)])
    assert out["meta"] is meta and out is not pose


def test_a_dataclass_field_its_constructor_does_not_take_is_computed_again() -> None:
    @dataclasses.dataclass
    class Scaled:
        x: Tensor
        double: Tensor = dataclasses.field(init=False)

        def __post_init__(self) -> None:
            self.double = 2 * self.x

    pose = Scaled(torch.ones(1))
    leaves, rebuild = flatten(pose)
    assert len(leaves) == 2 and leaves[0] is pose.x and leaves[1] is pose.double
    out = rebuild([torch.full((1,), 3.0), torch.zeros(1)])
    assert float(out.double) == 6.0 and float(pose.double) == 2.0


def test_hetero_data_stores_are_rebuilt_on_a_copy() -> None:
    data = pytest.importorskip("torch_geometric.data")
    pose = data.HeteroData()
    pose["ligand"].x = torch.ones(3, 2)
    pose["protein"].x = torch.ones(4, 2)
    pose["ligand", "near", "protein"].edge_index = torch.zeros(2, 5, dtype=torch.long)
    leaves, rebuild = flatten(pose)
    fresh = [t.clone() for t in leaves]
    out = rebuild(fresh)
    assert out["ligand"].x is fresh[0] and out["protein"].x is fresh[1]
    assert out["ligand", "near", "protein"].edge_index is fresh[2]
    assert pose["ligand"].x is leaves[0] and pose["protein"].x is leaves[1]  # untouched


# ---- through the model ---------------------------------------------------------------
class TwiceNet(torch.nn.Module):
    """Reads a pose's ``x`` from two places of a dict (one tensor held twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1).double()

    def forward(self, pose: dict[str, Any]) -> Tensor:
        a, (b,) = pose["a"], pose["nested"]
        return (torch.tanh(self.lin(a)) * b.sum(-1, keepdim=True)).sum(dim=(-2, -1))


@pytest.mark.filterwarnings("ignore::combframe.errors.StrategyWarning")  # store: one per pass
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [1, 2])
def test_a_tensor_held_twice_in_a_pose_gets_its_whole_gradient(strategy: str, chunk: int) -> None:
    def poses() -> list[dict[str, Any]]:
        gen = torch.Generator().manual_seed(3)
        out = []
        for _ in range(4):
            x = torch.randn(1, 3, generator=gen, dtype=torch.float64).requires_grad_()
            out.append({"a": x, "nested": [x], "label": "pose"})
        return out

    net, comb, loss = TwiceNet(), combframe.create_combination("boltzmann"), make_loss("combined")
    ref, got = poses(), poses()
    _, _, want = full_graph_gradients(net, comb, ref, loss)
    _, _, grads = multipose_gradients(net, comb, got, loss, strategy, chunk_size=chunk)
    torch.testing.assert_close(grads, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        [p["a"].grad for p in got], [p["a"].grad for p in ref], rtol=1e-10, atol=1e-12
    )


class Seen(torch.nn.Module):
    """Keeps what it is called on."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1).double()
        self.seen: list[Any] = []

    def forward(self, pose: dict[str, Tensor]) -> Tensor:
        self.seen.append(pose)
        return self.lin(pose["x"]).sum()


def test_a_pose_with_nothing_to_substitute_or_move_is_passed_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    poses = [{"x": torch.randn(1, 3, generator=gen, dtype=torch.float64)} for _ in range(3)]
    poses[1]["x"].requires_grad_()  # one pose gets a stand-in, the others need none
    net = Seen()
    combined, _ = combframe.MultiPoseModel(net, "mean", strategy="store", move_poses=True)(poses)
    combined.backward()
    assert net.seen[0] is poses[0] and net.seen[2] is poses[2]
    assert net.seen[1] is not poses[1] and net.seen[1]["x"] is not poses[1]["x"]
    assert poses[1]["x"].grad is not None
