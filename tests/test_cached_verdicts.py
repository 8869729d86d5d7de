"""A verdict store or stream keeps for a model is re-decided when the model changes.

Store's per-sample path and stream's one-compound-at-a-time chunks are allowed for a
model shown, on its first step, to treat the poses of a batch independently. A change
made afterwards that makes it mix them (a forward hook, a flag in a buffer) must be seen
on the next step: stream then stays exact, store refuses the model; an unchanged model
keeps its verdict (no second check).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import combframe
from combframe.testing import full_graph_gradients, make_loss

SIZES = [1, 3, 2]


class Linear(torch.nn.Module):
    """Independent until ``mix.k`` is set: ``y + k * mean(y)`` over the batch."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(4, 1).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(1, 4, generator=gen, dtype=torch.float64))
        self.register_buffer("k", torch.tensor(0.0, dtype=torch.float64))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        y = self.lin(x).sum((-1, -2)).reshape(-1)
        return y + self.k * y.mean()


def _mix(out: Tensor) -> Tensor:
    return out + 0.3 * out.mean()


def _set_flag(net: Linear) -> Callable[[], None]:
    net.k.fill_(0.3)
    return lambda: None


def _forward_hook(net: Linear) -> Callable[[], None]:
    return net.lin.register_forward_hook(lambda m, i, o: _mix(o)).remove


def _forward_pre_hook(net: Linear) -> Callable[[], None]:
    return net.lin.register_forward_pre_hook(lambda m, i: (i[0] + 0.3 * i[0].mean(0),)).remove


def _global_hook(net: Linear) -> Callable[[], None]:
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: _mix(o) if m is net.lin else o
    )
    return hook.remove


CHANGES = {
    "flag in a buffer": _set_flag,
    "forward hook": _forward_hook,
    "forward pre-hook": _forward_pre_hook,
    "global forward hook": _global_hook,
}


def poses(n: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(n)]


def compounds(flat: list[Tensor]) -> list[list[Tensor]]:
    return [flat[a:b] for a, b in itertools.pairwise([0, 1, 4, 6])]


def step(model: combframe.MultiPoseModel, flat: list[Tensor]) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(compounds=compounds(flat))
    make_loss("combined")(out.combined, out.per_pose).backward()
    return [p.grad.clone() for p in model.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("change", CHANGES)
def test_stream_sees_a_change_that_makes_the_model_mix_poses(change: str) -> None:
    net = Linear()
    model = combframe.MultiPoseModel(net, "boltzmann", strategy="stream", chunk_size=3)
    step(model, poses(6, 0))  # decides: the model treats the poses independently
    undo = CHANGES[change](net)
    try:
        got = step(model, poses(6, 1))
        want = full_graph_gradients(
            net, model.combination, poses(6, 1), make_loss("combined"), sizes=SIZES, chunk_size=3
        )[2]
    finally:
        undo()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change", CHANGES)
def test_store_refuses_a_model_that_mixes_poses_after_its_first_step(change: str) -> None:
    net = Linear()
    model = combframe.MultiPoseModel(net, "mean", strategy="store", chunk_size=3)
    step(model, poses(6, 0))
    undo = CHANGES[change](net)
    try:
        with pytest.raises(combframe.CombinationError, match="mixes the poses of a batch"):
            step(model, poses(6, 1))
    finally:
        undo()
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("strategy", ["store", "stream"])
def test_an_unchanged_model_keeps_its_verdict(strategy: str) -> None:
    net = Linear()
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = []
    for seed in range(3):
        net.calls = 0
        step(model, poses(6, seed))
        optimizer.step()
        calls.append(net.calls)
    assert calls[1] == calls[2] < calls[0]  # the first step's check is not repeated


# ---- a collate that pads: the poses' shapes decide whether the model mixes them -----------


def _pad(poses: list[Tensor]) -> Tensor:
    """Pad each (n_i, 4) pose with zeros to the longest of the batch: (B, n_max, 4)."""
    longest = max(p.shape[0] for p in poses)
    return torch.stack([torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[0])) for p in poses])


class MeanOverPadding(torch.nn.Module):
    """Averages over every row of the padded batch, padding included."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.lin = torch.nn.Linear(4, 1).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(1, 4, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)).mean((-1, -2))


def _rows(sizes: list[int], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in sizes]


def test_a_verdict_made_on_poses_of_one_shape_does_not_cover_other_shapes() -> None:
    """First step: poses of one shape, so padding changes nothing and splitting is allowed.

    A later batch of poses of different lengths is padded to the longest of its chunk, so
    the model now mixes them: stream runs the chunks whole, as recompute does, instead of
    splitting them at compounds. (Store runs a custom collate one pose per pass.)
    """
    net = MeanOverPadding()
    model = combframe.MultiPoseModel(
        net, "boltzmann", strategy="stream", chunk_size=4, collate=_pad
    )
    reference = combframe.MultiPoseModel(
        net, "boltzmann", strategy="recompute", chunk_size=4, collate=_pad
    )
    first = [_rows([3, 3], 0), _rows([3, 3], 1)]
    model(compounds=first).combined.sum().backward()
    net.zero_grad()
    later = [_rows([1, 5], 2), _rows([2], 3), _rows([4], 4)]
    model(compounds=later).combined.sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    reference(compounds=later).combined.sum().backward()
    for g, want in zip(got, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
