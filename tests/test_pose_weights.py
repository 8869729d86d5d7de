"""Which pose was picked: ``combframe.pose_weights`` for inspection and for a loss on the
weights (exact against the full graph in every strategy that takes per-pose losses)."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import combframe
import combframe.app.predict
from tests.conftest import make_mlp, make_poses
from tests.test_own_parameters import LearnedBoltzmann, assert_close

SIZES = [4, 1, 6]
MAKERS: list[Callable[[], combframe.Combination]] = [
    lambda: combframe.create_combination("max", pred_scale=2.0),
    lambda: combframe.create_combination("mean"),
    lambda: combframe.create_combination("boltzmann", kT=0.7),
    lambda: combframe.create_combination("boltzmann", kT=0.7, learn=["kT"]).double(),
    LearnedBoltzmann,
]


def _split(poses: list[Tensor], sizes: list[int] | None) -> list[list[Tensor]]:
    cut = torch.tensor(sizes or [len(poses)]).cumsum(0).tolist()
    return [poses[a:b] for a, b in zip([0, *cut[:-1]], cut, strict=True)]


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("sizes", [None, SIZES])
def test_weights_are_the_full_graph_derivative(
    make: Callable[[], combframe.Combination], sizes: list[int] | None
) -> None:
    comb = make()
    net = make_mlp()
    poses = make_poses(sum(sizes or [5]), seed=4)
    compounds = _split(poses, sizes)
    out = combframe.MultiPoseModel(net, comb)(compounds=compounds)
    got = combframe.pose_weights(comb, out.per_pose, out.index)
    assert not got.requires_grad
    y = out.per_pose.detach().requires_grad_(True)
    values = torch.stack([comb.value(p) for p in y.split([len(c) for c in compounds])])
    (want,) = torch.autograd.grad(values.sum(), y)
    assert_close([got], [want])
    if sizes is None:  # one compound: also the combination's own (maybe closed-form) weights
        closed = comb.pose_weights(out.per_pose.detach(), out.combined[0].detach())
        assert_close([closed], [want])
        assert_close([combframe.MultiPoseModel(net, comb).pose_weights(out.per_pose)], [want])


def _cross_entropy(weights: Tensor, index: Tensor, truth: Tensor) -> Tensor:
    """asapdiscovery's pose loss: -log of the weight of each compound's true pose."""
    starts = torch.cat([index.new_zeros(1), torch.bincount(index).cumsum(0)[:-1]])
    return -weights[starts + truth].clamp_min(1e-12).log().sum()


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("strategy", ["store", "recompute"])
@pytest.mark.parametrize(("sizes", "chunk"), [(None, 1), (None, 3), (SIZES, 1), (SIZES, 3)])
def test_a_loss_on_the_weights_gets_the_full_graph_gradient(
    make: Callable[[], combframe.Combination],
    strategy: str,
    sizes: list[int] | None,
    chunk: int,
) -> None:
    comb = make()
    poses = make_poses(sum(sizes or [5]), seed=6)
    compounds = _split(poses, sizes)
    truth = torch.tensor([len(c) // 2 for c in compounds])

    def gradients(run: Callable[[torch.nn.Module], tuple[Tensor, Tensor, Tensor]]) -> list[Tensor]:
        net = make_mlp()
        comb.zero_grad(set_to_none=True)
        combined, per_pose, index = run(net)
        weights = combframe.pose_weights(comb, per_pose, index, create_graph=True)
        loss = _cross_entropy(weights, index, truth) + (combined - 0.5).pow(2).sum()
        loss.backward()
        params = [*net.parameters(), *comb.parameters()]
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def full(net: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        per_pose = torch.stack([net(p).reshape(()) for p in poses])
        sizes_ = [len(c) for c in compounds]
        combined = torch.stack([comb.value(y) for y in per_pose.split(sizes_)])
        index = torch.repeat_interleave(torch.arange(len(sizes_)), torch.tensor(sizes_))
        return combined, per_pose, index

    def wrapped(net: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=chunk)
        return tuple(model(compounds=compounds))  # type: ignore[return-value]  # three tensors

    assert_close(gradients(wrapped), gradients(full))


def test_stream_refuses_a_loss_on_the_weights_by_name() -> None:
    comb = combframe.create_combination("max", pred_scale=2.0)
    out = combframe.MultiPoseModel(make_mlp(), comb, strategy="stream")(
        compounds=_split(make_poses(5), None)
    )
    inspect_only = combframe.pose_weights(comb, out.per_pose, out.index)  # inspection works
    assert torch.isclose(inspect_only.sum(), torch.tensor(1.0, dtype=inspect_only.dtype))
    weights = combframe.pose_weights(comb, out.per_pose, out.index, create_graph=True)
    with pytest.raises(combframe.StrategyError, match="per-pose"):
        (-weights[0].log()).backward()


def test_bad_shapes_are_refused() -> None:
    comb = combframe.create_combination("mean")
    with pytest.raises(combframe.CombinationError, match="per-pose predictions"):
        combframe.pose_weights(comb, torch.zeros(2, 3, 4))
    with pytest.raises(combframe.CombinationError, match="index"):
        combframe.pose_weights(comb, torch.zeros(3), torch.zeros(2, dtype=torch.long))


def test_predict_takes_its_pose_weights_from_the_public_function() -> None:
    """One home: ``combframe predict --poses`` differentiates nothing itself."""
    tree = ast.parse(inspect.getsource(combframe.app.predict))
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "model.pose_weights" in calls
    assert not any("autograd" in c for c in calls)
