"""Per-pose inputs to the combination: a log prior weight and a mask per pose, exact in
every strategy against the full graph, and refused by a combination that cannot use them."""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import pytest
import torch
from torch import Tensor

import combframe
import combframe.core.strategies.stream as stream_module
from combframe.testing import make_loss
from tests.conftest import make_mlp, make_poses
from tests.test_own_parameters import LearnedBoltzmann, assert_close

SIZES = [4, 1, 6]
MAKERS: list[Callable[[], combframe.Combination]] = [
    lambda: combframe.create_combination("max", pred_scale=2.0),
    lambda: combframe.create_combination("max", negate_preds=False, pred_scale=0.7),
    lambda: combframe.create_combination("mean"),
    lambda: combframe.create_combination("boltzmann", kT=0.7),
    lambda: combframe.create_combination("boltzmann", kT=0.7, learn=["kT"]).double(),
]


def _inputs(m: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prior = torch.randn(m, generator=gen, dtype=torch.float64)
    mask = torch.ones(m, dtype=torch.bool)
    mask[0] = False  # the first pose of the first compound, and a later one
    mask[m - 2] = False
    return prior, mask


def _full(
    comb: combframe.Combination, sizes: list[int], prior: Tensor
) -> Callable[[torch.nn.Module, list[Tensor]], tuple[Tensor, Tensor]]:
    def run(net: torch.nn.Module, poses: list[Tensor]) -> tuple[Tensor, Tensor]:
        per_pose = torch.stack([net(p).reshape(()) for p in poses])
        parts = zip(per_pose.split(sizes), prior.split(sizes), strict=True)
        return torch.stack([comb.value(y, prior=q) for y, q in parts]), per_pose

    return run


def _grads(
    comb: combframe.Combination,
    run: Callable[[torch.nn.Module, list[Tensor]], tuple[Tensor, Tensor]],
    poses: list[Tensor],
    kind: str,
) -> list[Tensor]:
    net = make_mlp()
    comb.zero_grad(set_to_none=True)
    combined, per_pose = run(net, poses)
    make_loss(kind)(combined, per_pose).backward()  # type: ignore[arg-type]  # kind is a LossKind
    params = [*net.parameters(), *comb.parameters()]
    return [combined.detach(), *(p.grad if p.grad is not None else torch.zeros(0) for p in params)]


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("strategy", ["store", "recompute", "stream", "stream-device"])
@pytest.mark.parametrize(("sizes", "chunk"), [(None, 1), (None, 3), (SIZES, 1), (SIZES, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_a_prior_and_mask_are_exact_in_every_strategy(
    make: Callable[[], combframe.Combination],
    strategy: str,
    sizes: list[int] | None,
    chunk: int,
    masked: bool,
) -> None:
    comb = make()
    n = sum(sizes or [6])
    poses = make_poses(n, seed=8)
    prior, mask = _inputs(n, seed=1)
    log_prior = prior.masked_fill(~mask, -torch.inf) if masked else prior
    split = sizes or [n]
    if masked and min(m.any() for m in mask.split(split)) == 0:
        pytest.skip("a compound with every pose masked")  # pragma: no cover

    def wrapped(net: torch.nn.Module, poses: list[Tensor]) -> tuple[Tensor, Tensor]:
        name = strategy.removesuffix("-device")  # stream's device bookkeeping (GPUs) too
        model = combframe.MultiPoseModel(net, comb, strategy=name, chunk_size=chunk)
        side = {"prior": prior, **({"mask": mask} if masked else {})}
        if sizes is None:
            combined, per_pose = model(poses, **side)
            return combined.reshape(1), per_pose
        cut = torch.tensor(sizes).cumsum(0).tolist()
        compounds = [poses[a:b] for a, b in zip([0, *cut[:-1]], cut, strict=True)]
        per_compound = {k: list(v.split(sizes)) for k, v in side.items()}  # lists work too
        out = model(compounds=compounds, **per_compound)
        return out.combined, out.per_pose

    kinds = ["combined"] if strategy.startswith("stream") else ["combined", "both"]
    on_host = strategy != "stream-device"
    for kind in kinds:
        want = _grads(comb, _full(comb, split, log_prior), poses, kind)
        with mock.patch.object(stream_module, "_host_scalars", return_value=on_host):
            got = _grads(comb, wrapped, poses, kind)
        assert_close(got, want)


def test_a_mask_is_a_prior_of_minus_infinity_and_drops_the_pose() -> None:
    comb = combframe.create_combination("mean")
    poses = make_poses(4, seed=2)
    net = make_mlp()
    model = combframe.MultiPoseModel(net, comb)
    keep = torch.tensor([True, False, True, True])
    combined, per_pose = model(poses, mask=keep)
    assert torch.allclose(combined, per_pose[keep].mean())
    weights = model.pose_weights(per_pose, mask=keep)
    assert weights[1] == 0 and torch.allclose(weights[keep], torch.full((3,), 1 / 3).double())


def test_pose_weights_take_the_prior() -> None:
    comb = combframe.create_combination("max", pred_scale=3.0)
    per_pose = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    prior = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    got = combframe.pose_weights(comb, per_pose, prior=prior)
    assert torch.allclose(got, torch.softmax(-3.0 * per_pose + prior, 0))


def test_a_combination_without_a_prior_refuses_it_by_name() -> None:
    model = combframe.MultiPoseModel(make_mlp(), LearnedBoltzmann())
    poses = make_poses(3)
    with pytest.raises(combframe.CombinationError, match="'learned_boltzmann' takes no per-pose"):
        model(poses, prior=torch.zeros(3))
    with pytest.raises(combframe.CombinationError, match="takes no per-pose"):
        model(poses, mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("side", "match"),
    [
        ({"prior": torch.zeros(2)}, "shape \\(2,\\), but the call has 3 poses"),
        ({"prior": torch.tensor([0.0, float("nan"), 0.0])}, "NaN or \\+inf"),
        ({"mask": torch.zeros(3, dtype=torch.bool)}, "every pose masked"),
        ({"mask": torch.tensor([1.0, 0.5, 2.0])}, "other than 0 and 1 at poses \\[1, 2\\]"),
        ({"mask": torch.tensor([1.0, float("nan"), 1.0])}, "fractional weights give a prior"),
    ],
)
def test_bad_priors_are_refused_before_any_work(side: dict[str, Tensor], match: str) -> None:
    net = make_mlp()
    model = combframe.MultiPoseModel(net, "boltzmann")
    with pytest.raises(combframe.CombinationError, match=match):
        model(make_poses(3), **side)
    assert all(p.grad is None for p in net.parameters())


def test_a_mask_of_0_1_numbers_is_the_bool_mask() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "boltzmann")
    poses = make_poses(3)
    want = model(poses, mask=torch.tensor([True, False, True]))[0]
    for keep in (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1, 0, 1])):
        assert torch.equal(model(poses, mask=keep)[0], want)


def test_forward_compounds_takes_the_prior_too() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "mean")
    compounds = [make_poses(3, seed=1), make_poses(2, seed=2)]
    keep = [torch.tensor([True, False, True]), torch.tensor([False, True])]
    got = model.forward_compounds(compounds, mask=keep)
    want = model(compounds=compounds, mask=keep)
    assert torch.equal(got.combined, want.combined)
    assert torch.allclose(got.combined[1], got.per_pose[4])
