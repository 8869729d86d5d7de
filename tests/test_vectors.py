"""Vector outputs: a model returning d values per pose, (N, d) -> (d,) per compound.

Column-wise combinations (mean, max, Boltzmann: reductions over dim 0) combine each
column on its own; every strategy is checked against the full graph in float64, with a
prior and a mask too, and a learned temperature."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import combframe
from combframe.errors import CombinationError
from combframe.testing import (
    full_graph_gradients,
    gradient_parity,
    make_loss,
    multipose_gradients,
    random_model,
)
from tests.conftest import make_poses

MAKERS: dict[str, Callable[[], combframe.Combination]] = {
    "mean": lambda: combframe.create_combination("mean"),
    "max": lambda: combframe.create_combination("max", pred_scale=2.0),
    "boltzmann": lambda: combframe.create_combination("boltzmann", kT=0.7),
    "learned-kT": lambda: combframe.create_combination("boltzmann", kT=0.7, learn=["kT"]).double(),
}
STRATEGIES = ("store", "recompute", "stream", "auto")


def assert_vector_parity(combination: combframe.Combination, prior: bool) -> None:
    """Every strategy x chunk sizes 1-3 x one and three compounds, 3 values per pose."""
    result = gradient_parity(
        combination,
        strategies=STRATEGIES,
        outputs=3,
        n_poses=(3,) if prior else (1, 4),  # N = 1 once; a mask needs N > 1
        seeds=(0,),
        chunk_sizes=(1, 2, 3),
        compounds=(1, 3),
        prior=prior,
    )
    assert result.passed, (result.worst, result.errors)
    assert {s for s, *_ in result.cases} == set(STRATEGIES)
    assert result.worst <= 1e-10


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("name", list(MAKERS))
def test_column_wise_combinations_are_exact_in_every_strategy(name: str, prior: bool) -> None:
    assert_vector_parity(MAKERS[name](), prior)


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_shapes_follow_the_scalar_ones(chunk_size: int) -> None:
    net = random_model(0, 5, outputs=3)
    model = combframe.MultiPoseModel(net, "boltzmann", strategy="store", chunk_size=chunk_size)
    combined, per_pose = model(make_poses(4))
    assert combined.shape == (3,) and per_pose.shape == (4, 3)
    out = model(compounds=[make_poses(2), make_poses(3, seed=1)])
    assert out.combined.shape == (2, 3) and out.per_pose.shape == (5, 3)
    seen: list[tuple[int, ...]] = []
    readout = combframe.MultiPoseModel(
        net, "mean", comb_readout=lambda g: seen.append(tuple(g.shape)) or g.sum(-1)
    )
    assert readout(compounds=[make_poses(2), make_poses(3)]).combined.shape == (2,)
    assert seen == [(2, 3)]


def test_an_output_of_b_elements_stays_one_value_per_pose() -> None:
    net = random_model(0, 5, outputs=1)
    wide = torch.nn.Sequential(net, torch.nn.Unflatten(0, (-1, 1)))  # (b, 1)
    combined, per_pose = combframe.MultiPoseModel(wide, "max", chunk_size=2)(make_poses(3))
    assert combined.shape == () and per_pose.shape == (3,)


class _Widths(torch.nn.Module):
    """Returns 3 values for a pose whose first feature is positive, 2 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 3).double()

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        out = self.lin(pose)
        return out if bool(pose[0, 0] > 0) else out[:, :2]


@pytest.mark.parametrize("strategy", ["store", "recompute", "stream", "auto"])
def test_poses_with_different_d_are_refused_naming_both(strategy: str) -> None:
    poses = [torch.full((1, 5), 1.0, dtype=torch.float64)] * 2
    poses.append(torch.full((1, 5), -1.0, dtype=torch.float64))
    model = combframe.MultiPoseModel(_Widths(), "mean", strategy=strategy)
    with pytest.raises(CombinationError, match=r"pose 2 returned d=2.*pose 0 returned d=3"):
        model(poses)


def test_pose_weights_of_a_column_wise_combination_are_per_column() -> None:
    comb = combframe.create_combination("boltzmann", kT=0.7)
    y = torch.randn(5, 3, dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 1, 1])
    weights = combframe.pose_weights(comb, y, index)
    assert weights.shape == (5, 3)
    for col in range(3):
        want = combframe.pose_weights(comb, y[:, col].contiguous(), index)
        torch.testing.assert_close(weights[:, col], want)


def test_the_mtenn_call_refuses_vector_predictions() -> None:
    import combframe.registry  # installs the mtenn call

    net = random_model(0, 5)
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    grads = {n: [torch.zeros_like(p)] * 2 for n, p in zip(names, params, strict=True)}
    comb = combframe.create_combination("mean")
    for preds in ([torch.zeros(3)] * 2, torch.zeros(2, 3)):
        with pytest.raises(CombinationError, match=r"d values per pose.*MultiPoseModel"):
            comb(preds, grads, names, *params)


def _attention() -> combframe.Combination:
    from combframe_attention import GatedAttention

    torch.manual_seed(0)
    return GatedAttention(dim=3, hidden=4).double()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [MAKERS["boltzmann"], _attention], ids=["boltzmann", "attention"])
@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_pose_tensors_get_their_gradients_with_vector_outputs(
    device: str, make: Callable[[], combframe.Combination], strategy: str, chunk: int
) -> None:
    """Forces: poses that require grad, several compounds, chunks across them."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    comb, sizes = make(), [3, 1, 4]
    loss = make_loss("combined" if strategy == "stream" else "both")
    cpu = [p.requires_grad_() for p in make_poses(8, seed=4)]
    want = full_graph_gradients(random_model(3, 5, outputs=3), comb, cpu, loss, sizes=sizes)
    leaves = [p.detach().to(device).requires_grad_() for p in cpu]
    net = random_model(3, 5, outputs=3).to(device)
    comb = comb.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        got = multipose_gradients(net, comb, leaves, loss, strategy, sizes=sizes, chunk_size=chunk)
    pairs = [
        *zip(got[2], want[2], strict=True),
        *((x.grad, p.grad) for x, p in zip(leaves, cpu, strict=True)),
        (got[0], want[0]),
        (got[1], want[1]),
    ]
    scale = max(float(b.abs().max()) for _, b in pairs if b is not None)
    for a, b in pairs:  # w's bias gets zero (a softmax ignores a shift): one common scale
        assert a is not None and b is not None
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10 * scale)
