"""The core's fast paths: stream's per-pose gradients for chunks of many compounds, store's
per-sample verdict kept per model, and poses walked once per forward (float64 parity with
the full graph, and the work done counted, never timed)."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor

import combframe
from combframe.testing import full_graph_gradients, make_loss, multipose_gradients
from tests.conftest import make_mlp, make_poses
from tests.test_batched import MixesPoses, rel_err

SIZES = [1, 3, 1, 1, 2, 4, 1, 3]


class Counting(torch.nn.Module):
    """Counts its forward calls (a ``torch.func`` pass over a chunk counts once)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.inner(x)
        return out


def _stream_grads(wrapped: combframe.MultiPoseModel, poses: list[Any]) -> list[Tensor]:
    wrapped.zero_grad(set_to_none=True)
    compounds, start = [], 0
    for size in SIZES:
        compounds.append(poses[start : start + size])
        start += size
    combined = wrapped(compounds=compounds).combined
    make_loss("combined")(combined, combined).backward()
    return [p.grad.clone() for p in wrapped.model.parameters()]  # type: ignore[union-attr]  # reached


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("combination", ["boltzmann", "max", "mean"])
def test_stream_runs_chunks_of_many_compounds_in_pieces(chunk: int, combination: str) -> None:
    """After the first step a model that treats poses independently runs, per chunk, each
    compound that spans chunks as its own piece (running sums) and the compounds inside
    the chunk as one piece, re-run in the backward (the last, kept from the forward, not)."""
    poses = make_poses(sum(SIZES), seed=2)
    comb = combframe.create_combination(combination)
    want = full_graph_gradients(make_mlp(), comb, poses, make_loss("combined"), sizes=SIZES)
    net = Counting(make_mlp())
    wrapped = combframe.MultiPoseModel(net, comb, strategy="stream", chunk_size=chunk)
    for step in range(2):
        net.calls = 0
        got = _stream_grads(wrapped, poses)
        assert rel_err(got, want[2]) < 1e-10, f"step {step}"
    owner = [c for c, size in enumerate(SIZES) for _ in range(size)]
    first = [owner.index(c) for c in range(len(SIZES))]
    spans = [f // chunk != (f + n - 1) // chunk for f, n in zip(first, SIZES, strict=True)]
    chunks = [(s, min(s + chunk, len(poses))) for s in range(0, len(poses), chunk)]
    calls = 0
    for s, e in chunks:
        inside = set(owner[s:e]) - {c for c in owner[s:e] if spans[c]}
        calls += len(set(owner[s:e])) - len(inside) + 2 * bool(inside)  # re-run in backward
    last = owner[-1]
    calls -= not spans[last]  # the last piece's graph is kept from the forward
    assert net.calls == calls, f"{net.calls} model calls, not {calls}"


def test_stream_split_returns_the_gradients_of_pose_tensors() -> None:
    """Pose tensors that require grad (forces) get theirs on the split path too."""
    ref = [p.requires_grad_() for p in make_poses(sum(SIZES), seed=4)]
    comb = combframe.create_combination("boltzmann")
    full_graph_gradients(make_mlp(), comb, ref, make_loss("combined"), sizes=SIZES)
    poses = [p.detach().clone().requires_grad_() for p in ref]
    wrapped = combframe.MultiPoseModel(make_mlp(), comb, strategy="stream", chunk_size=4)
    for _ in range(2):
        for p in poses:
            p.grad = None
        _stream_grads(wrapped, poses)
        assert rel_err([p.grad for p in poses], [p.grad for p in ref]) < 1e-10


def test_stream_keeps_whole_chunks_for_a_model_that_mixes_the_poses_of_a_batch() -> None:
    """Its one-compound predictions are not the chunk's: no split, the result exact."""
    poses = [torch.randn(1, 5, dtype=torch.float64) for _ in range(12)]
    sizes = [2, 2, 2, 2, 2, 2]
    loss = make_loss("combined")
    torch.manual_seed(0)
    net = MixesPoses()
    comb = combframe.create_combination("boltzmann")
    want = full_graph_gradients(net, comb, poses, loss, sizes=sizes, chunk_size=4)
    wrapped = combframe.MultiPoseModel(net, comb, strategy="stream", chunk_size=4)
    compounds = [poses[i : i + 2] for i in range(0, 12, 2)]
    for _ in range(2):
        wrapped.zero_grad(set_to_none=True)
        combined = wrapped(compounds=compounds).combined
        loss(combined, combined).backward()
        assert rel_err([p.grad for p in net.parameters()], want[2]) < 1e-10


def _store_step(wrapped: combframe.MultiPoseModel, poses: list[Any]) -> None:
    wrapped.zero_grad(set_to_none=True)
    wrapped(poses)[0].backward()


def test_store_decides_the_per_sample_path_once_per_model() -> None:
    """After the first step: one forward for pose 0 and one per chunk, nothing more."""
    net = Counting(make_mlp())
    wrapped = combframe.MultiPoseModel(net, "boltzmann", strategy="store", chunk_size=4)
    poses = make_poses(13)
    _store_step(wrapped, poses)
    first = net.calls
    net.calls = 0
    _store_step(wrapped, poses)
    assert net.calls == 1 + 3, f"{net.calls} forwards for pose 0 and 3 chunks"
    assert first > net.calls, "the first step checks the model"
    net.calls = 0
    wrapped.model.inner[0].bias.requires_grad_(False)  # the structure changed: decide again
    _store_step(wrapped, poses)
    assert net.calls > 1 + 3
    want = full_graph_gradients(net, combframe.create_combination("boltzmann"), poses,
                                make_loss("combined"))  # fmt: skip
    got = multipose_gradients(net, combframe.create_combination("boltzmann"), poses,
                              make_loss("combined"), "store", chunk_size=4)  # fmt: skip
    assert rel_err(got[2], want[2]) < 1e-10


def test_store_checks_a_new_model_that_mixes_poses_although_another_passed() -> None:
    store = combframe.Store()
    good = combframe.MultiPoseModel(make_mlp(), "mean", strategy=store, chunk_size=3)
    good(make_poses(6))[0].backward()
    bad = combframe.MultiPoseModel(MixesPoses(), "mean", strategy=store, chunk_size=3)
    with pytest.raises(combframe.CombinationError, match="mixes the poses of a batch"):
        bad(make_poses(6))


@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_each_pose_is_walked_once_per_forward(strategy: str) -> None:
    """The runner flattens each pose once; nothing walks the poses again."""
    import combframe.core.strategies.runner as runner

    poses = make_poses(6)
    wrapped = combframe.MultiPoseModel(make_mlp(), "boltzmann", strategy=strategy)
    with mock.patch.object(runner, "flatten", wraps=runner.flatten) as walk:
        combined, _ = wrapped(poses)
        combined.backward()
    assert walk.call_count == len(poses)


class Records(torch.nn.Module):
    """Keeps the type of what it is called on; one output per graph or per pose."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1).double()
        self.seen: list[type] = []

    def forward(self, data: Any) -> Tensor:
        self.seen.append(type(data))
        if isinstance(data, Tensor):
            return self.lin(data).sum(dim=(-2, -1))
        atom = self.lin(data.x).squeeze(-1)
        return torch.zeros(data.num_graphs, dtype=atom.dtype).index_add(0, data.batch, atom)


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_pyg_model_gets_a_batch_at_every_chunk_size(chunk: int) -> None:
    pyg = pytest.importorskip("torch_geometric.data")
    poses = [pyg.Data(x=torch.randn(n, 3, dtype=torch.float64)) for n in (2, 4, 3)]
    net = Records()
    combframe.MultiPoseModel(net, "mean", strategy="recompute", chunk_size=chunk)(poses)
    assert net.seen and all(issubclass(t, pyg.Batch) for t in net.seen), net.seen


def test_a_tensor_model_gets_the_pose_itself_at_chunk_size_one() -> None:
    net = Records()
    poses = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    combframe.MultiPoseModel(net, "mean")(poses)
    assert set(net.seen) == {Tensor}


@pytest.mark.parametrize("strategy", ["store", "stream"])
def test_a_model_pickles_after_its_strategy_decided(strategy: str) -> None:
    import copy
    import io

    wrapped = combframe.MultiPoseModel(make_mlp(), "boltzmann", strategy=strategy, chunk_size=3)
    wrapped(compounds=[make_poses(3), make_poses(4)]).combined.sum().backward()
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(wrapped)):
        other(compounds=[make_poses(3), make_poses(4)]).combined.sum().backward()
