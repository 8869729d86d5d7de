"""A combination's own parameters and hyperparameters: exact gradients in every strategy
and in the mtenn-style call, values taken in the forward, and mtenn's ``None`` gradients."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from unittest import mock

import pytest
import torch
from combframe_boltzmann import BoltzmannCombination
from combframe_max import MaxCombination, MaxCombinationFunc
from torch import Tensor

import combframe
import combframe.core.strategies.stream as strategies_module
from combframe.app.cli import main
from combframe.testing import (
    full_graph_gradients,
    gradient_parity,
    isolated_registry,
    make_loss,
    mtenn_gradients,
    multipose_gradients,
    register_plugin,
)
from tests.conftest import make_mlp, make_poses
from tests.test_exactness import PartlyUsed

RTOL = 1e-10
STRATEGIES = ("store", "recompute", "stream")


class LearnedBoltzmann(combframe.Combination):
    r"""A Boltzmann mean whose temperature is learnt: :math:`kT = e^{\phi}`.

    Its stream terms and coefficients both depend on :math:`\phi` (as the shipped
    Boltzmann's depend on ``kT``).
    """

    name = "learned_boltzmann"

    def __init__(self, log_kt: float = -0.4) -> None:
        super().__init__()
        self.log_kt = torch.nn.Parameter(torch.tensor(log_kt, dtype=torch.float64))

    def value(self, preds: Tensor) -> Tensor:
        return (torch.softmax(-preds / self.log_kt.exp(), dim=0) * preds).sum()

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        feats = torch.stack([torch.ones_like(preds), preds - center], -1)
        return -preds / self.log_kt.exp(), feats

    def stream_shift(self, old: Tensor, new: Tensor) -> Tensor:
        one, zero = torch.ones_like(old), torch.zeros_like(old)
        return torch.stack([torch.stack([one, zero]), torch.stack([old - new, one])])

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        beta = torch.exp(-self.log_kt).to(combined.dtype)
        return torch.stack([1.0 + beta * (combined - center), -beta])


class LearnedSoftMin(combframe.Combination):
    """A smooth minimum with a learnt sharpness and a learnt offset (two parameters)."""

    name = "learned_softmin"

    def __init__(self) -> None:
        super().__init__()
        self.log_t = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.shift = torch.nn.Parameter(torch.tensor(0.25, dtype=torch.float64))

    def value(self, preds: Tensor) -> Tensor:
        t = self.log_t.exp()
        return -t * torch.logsumexp(-preds / t, dim=0) + self.shift

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        return -preds / self.log_t.exp(), torch.ones_like(preds).unsqueeze(-1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        return combined.new_ones(1)


def own_grads(combination: torch.nn.Module) -> list[Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros(0) for p in combination.parameters()
    ]


def assert_close(got: Sequence[Tensor], want: Sequence[Tensor], rtol: float = RTOL) -> None:
    assert len(got) == len(want)
    scale = max(w.abs().max().item() for w in want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"gradient {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g - w).abs().max().item() / scale
        assert err <= rtol, f"gradient {i} differs by {err:.3e} relative"


# ---- issue 17 item 0: the combination's own parameters ---------------------------------------
@pytest.mark.parametrize("make", [LearnedBoltzmann, LearnedSoftMin])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("sizes", "chunk"), [(None, 1), (None, 3), ([4, 1, 6], 1), ([4, 1, 6], 3)])
def test_own_parameters_get_the_full_graph_gradient(
    make: Callable[[], combframe.Combination],
    strategy: str,
    sizes: list[int] | None,
    chunk: int,
) -> None:
    comb = make()
    poses = make_poses(11 if sizes else 7, seed=3)
    loss = make_loss("combined")
    want = full_graph_gradients(make_mlp(), comb, poses, loss, sizes=sizes)
    want_own = own_grads(comb)
    comb.zero_grad(set_to_none=True)
    got = multipose_gradients(
        make_mlp(), comb, poses, loss, strategy, sizes=sizes, chunk_size=chunk
    )
    assert all(p.grad is not None for p in comb.parameters()), "a parameter got no gradient"
    assert_close(own_grads(comb), want_own)
    assert_close(got[2], want[2])  # the model's and the combination's, as the harness lists them


@pytest.mark.parametrize(("sizes", "chunk"), [(None, 1), (None, 3), ([4, 1, 6], 1), ([4, 1, 6], 3)])
def test_own_parameters_under_stream_with_device_bookkeeping(
    sizes: list[int] | None, chunk: int
) -> None:
    """Stream's tensor bookkeeping (GPUs) as well as its host one (CPU): phi stays out of
    the running sums, and gets its gradient."""
    comb = LearnedBoltzmann()
    poses = make_poses(11 if sizes else 7, seed=3)
    loss = make_loss("combined")
    want = full_graph_gradients(make_mlp(), comb, poses, loss, sizes=sizes)
    sums = strategies_module._StreamSums
    with (
        mock.patch.object(strategies_module, "_host_scalars", return_value=False),
        mock.patch.object(sums, "finish", autospec=True, side_effect=sums.finish) as finish,
    ):
        got = multipose_gradients(
            make_mlp(), comb, poses, loss, "stream", sizes=sizes, chunk_size=chunk
        )
    assert_close(got[2], want[2])
    state = finish.call_args.args[0]
    held = {"acc": state.acc, "total": state.total, "running_max": state.running_max}
    assert not any(t.requires_grad for t in held.values()), "the running sums hold a graph"


def test_parity_harness_compares_own_parameters() -> None:
    result = gradient_parity(LearnedBoltzmann(), n_poses=(1, 5), seeds=(0,))
    assert result.passed, result.cases
    assert {s for s, *_ in result.cases} == {"store", "recompute", "stream", "auto", "mtenn"}
    assert result.worst <= RTOL


class DetachedOwnParameter(LearnedSoftMin):
    """Wrong on purpose: the batched value (used by MultiPoseModel) drops the parameter's
    gradient, while :meth:`value` (the full graph's) keeps it."""

    name = "detached_softmin"

    def segment_value(self, preds: Tensor, index: Tensor, num_segments: int) -> Tensor:
        with torch.no_grad():
            shift = self.shift.clone()
        t = self.log_t.exp()
        return torch.stack(
            [
                -t * torch.logsumexp(-p / t, 0) + shift
                for p in preds.split(torch.bincount(index, minlength=num_segments).tolist())
            ]
        )


def test_parity_harness_catches_a_wrong_own_gradient() -> None:
    result = gradient_parity(
        DetachedOwnParameter(),
        strategies=("store",),
        losses=("combined",),
        n_poses=(3,),
        seeds=(0,),
    )
    assert not result.passed
    assert result.worst > 1e-3


def test_check_command_covers_own_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    with isolated_registry():
        register_plugin(LearnedBoltzmann)
        register_plugin(DetachedOwnParameter)
        assert main(["check", "learned_boltzmann", "--seeds", "0", "--poses", "3"]) == 0
        assert "PASS learned_boltzmann" in capsys.readouterr().out
        assert main(["check", "detached_softmin", "--seeds", "0", "--poses", "3"]) == 1
        assert "FAIL detached_softmin" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_own_parameters_train_with_a_frozen_model(strategy: str) -> None:
    net = make_mlp().requires_grad_(False)
    comb = LearnedBoltzmann()
    poses = make_poses(5, seed=1)
    combined, _ = combframe.MultiPoseModel(net, comb, strategy=strategy)(poses)
    (combined - 0.5).pow(2).backward()
    got = own_grads(comb)
    want = full_graph_gradients(net, comb, poses, lambda c, _: (c - 0.5).pow(2))
    assert_close(got, want[2])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backward_error_writes_no_own_gradient(strategy: str) -> None:
    """The combination's parameters wait for the poses' backward, as a comb_readout's do."""
    comb = LearnedBoltzmann()
    net = make_mlp()
    combined, _ = combframe.MultiPoseModel(net, comb, strategy=strategy)(make_poses(4))
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # the optimizer stepped before backward
    with pytest.raises(combframe.CombinationError, match="modified in place"):
        combined.backward()
    assert all(p.grad is None for p in [*comb.parameters(), *net.parameters()])


class PositiveTemperature(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.softplus(x)


class ParametrizedBoltzmann(LearnedBoltzmann):
    """kT kept positive by a parametrization (its parameter is ``parametrizations.kt.original``)."""

    name = "parametrized_boltzmann"

    def __init__(self) -> None:
        super().__init__()
        self.kt = torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
        torch.nn.utils.parametrize.register_parametrization(self, "kt", PositiveTemperature())
        del self.log_kt

    def value(self, preds: Tensor) -> Tensor:
        return (torch.softmax(-preds / self.kt, dim=0) * preds).sum()

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        feats = torch.stack([torch.ones_like(preds), preds - center], -1)
        return -preds / self.kt, feats

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        beta = (1.0 / self.kt).to(combined.dtype)
        return torch.stack([1.0 + beta * (combined - center), -beta])


def test_a_parametrized_own_parameter_is_exact_everywhere() -> None:
    comb = ParametrizedBoltzmann()
    assert [n for n, _ in comb.named_parameters()] == ["parametrizations.kt.original"]
    result = gradient_parity(comb, n_poses=(1, 5), seeds=(0,))
    assert result.passed, result.cases
    assert {s for s, *_ in result.cases} == {"store", "recompute", "stream", "auto", "mtenn"}


def test_stream_refusal_writes_no_own_gradient() -> None:
    comb = LearnedBoltzmann()
    net = make_mlp()
    combined, per_pose = combframe.MultiPoseModel(net, comb, strategy="stream")(make_poses(4))
    with pytest.raises(combframe.StrategyError, match="per-pose"):
        (combined + per_pose.sum()).backward()
    assert all(p.grad is None for p in [*comb.parameters(), *net.parameters()])


def test_mtenn_call_gives_own_parameters_their_gradient() -> None:
    comb = LearnedSoftMin()
    poses = make_poses(6, seed=2)
    for kind in ("combined", "both"):
        loss = make_loss(kind)
        want = full_graph_gradients(make_mlp(), comb, poses, loss)
        want_own = own_grads(comb)
        comb.zero_grad(set_to_none=True)
        got = mtenn_gradients(make_mlp(), comb, poses, loss)
        assert all(p.grad is not None for p in comb.parameters()), "a parameter got no gradient"
        assert_close(own_grads(comb), want_own)
        assert_close(got[2], want[2])


def test_mtenn_call_error_writes_no_own_gradient() -> None:
    comb = LearnedSoftMin()
    net = make_mlp()
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    grad_dict: dict[str, list[Tensor]] = {n: [] for n in names}
    preds = []
    for pose in make_poses(3):
        pred = net(pose).reshape(())
        for n, g in zip(names, torch.autograd.grad(pred, params), strict=True):
            grad_dict[n].append(g)
        preds.append(pred.detach())
    combined, _ = comb(preds, grad_dict, names, *params)
    with torch.no_grad():
        params[0].add_(1.0)  # the optimizer stepped before backward
    with pytest.raises(combframe.CombinationError, match="modified in place"):
        combined.backward()
    assert all(p.grad is None for p in [*comb.parameters(), *params])


# ---- issue 17 item 3: hyperparameters are those of the forward ------------------------------
def _schedule_step(comb: combframe.Combination) -> None:
    """What a schedule stepped between forward and backward does."""
    if isinstance(comb, MaxCombination):
        comb.pred_scale = comb.pred_scale * 7.0
    elif isinstance(comb, BoltzmannCombination):
        comb.kT = comb.kT * 4.0
    else:
        with torch.no_grad():
            for p in comb.parameters():
                p.add_(0.9)


COMBINATIONS: list[Callable[[], combframe.Combination]] = [
    lambda: MaxCombination(negate_preds=True, pred_scale=3.0),
    lambda: BoltzmannCombination(kT=0.5),
    LearnedBoltzmann,
]


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("make", COMBINATIONS)
@pytest.mark.parametrize(("sizes", "chunk"), [(None, 1), (None, 4), ([3, 5, 2], 1), ([3, 5, 2], 4)])
def test_stream_uses_the_forwards_hyperparameters(
    make: Callable[[], combframe.Combination], sizes: list[int] | None, chunk: int, on_host: bool
) -> None:
    comb = make()
    poses = make_poses(10 if sizes else 8, seed=5)
    loss = make_loss("combined")
    want = full_graph_gradients(make_mlp(), copy.deepcopy(comb), poses, loss, sizes=sizes)
    net = make_mlp()
    model = combframe.MultiPoseModel(net, comb, strategy="stream", chunk_size=chunk)
    with mock.patch.object(strategies_module, "_host_scalars", return_value=on_host):
        if sizes is None:
            combined, per_pose = model(poses)
        else:
            cut = [0, 3, 8, 10]
            compounds = [poses[a:b] for a, b in itertools.pairwise(cut)]
            combined, per_pose, _ = model(compounds=compounds)
    _schedule_step(comb)
    loss(combined, per_pose).backward()
    assert_close([p.grad for p in [*net.parameters(), *comb.parameters()]], want[2])


@pytest.mark.parametrize("make", COMBINATIONS)
@pytest.mark.parametrize("kind", ["combined", "both"])
def test_mtenn_call_uses_the_forwards_hyperparameters(
    make: Callable[[], combframe.Combination], kind: str
) -> None:
    comb = make()
    poses = make_poses(6, seed=4)
    loss = make_loss(kind)  # type: ignore[arg-type]  # one of LOSSES
    want = full_graph_gradients(make_mlp(), copy.deepcopy(comb), poses, loss)
    net = make_mlp()
    preds, grad_dict, names, params = _collect(net, poses)
    combined, per_pose = comb(preds, grad_dict, names, *params)
    _schedule_step(comb)
    loss(combined, per_pose).backward()
    assert_close([p.grad for p in [*params, *comb.parameters()]], want[2])


def test_mtenn_function_is_unaffected_by_later_changes() -> None:
    poses = make_poses(5, seed=6)
    loss = make_loss("combined")
    want = full_graph_gradients(make_mlp(), MaxCombination(True, 3.0), poses, loss)
    preds, grad_dict, names, params = _collect(make_mlp(), poses)
    combined, per_pose = MaxCombinationFunc.apply(True, 3.0, preds, grad_dict, names, *params)
    loss(combined, per_pose).backward()
    assert_close([p.grad for p in params], want[2])


def _collect(
    net: torch.nn.Module, poses: Sequence[Tensor], allow_unused: bool = False
) -> tuple[list[Tensor], dict[str, list[Tensor | None]], list[str], list[Tensor]]:
    """What mtenn's GroupedModel collects: predictions and per-pose gradients."""
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    grad_dict: dict[str, list[Tensor | None]] = {n: [] for n in names}
    preds = []
    for pose in poses:
        pred = net(pose).reshape(())
        grads = torch.autograd.grad(pred, params, allow_unused=allow_unused)
        for n, g in zip(names, grads, strict=True):
            grad_dict[n].append(g)
        preds.append(pred.detach())
    return preds, grad_dict, names, params


# ---- issue 17 item 10: mtenn's None gradients -------------------------------------------------
@pytest.mark.parametrize("kind", ["combined", "per_pose", "both"])
def test_mtenn_none_gradients_count_as_zeros(kind: str) -> None:
    poses = make_poses(6, seed=8)
    assert 0 < sum(bool(p[..., 0].max() > 0) for p in poses) < 6, "the branch must be mixed"
    loss = make_loss(kind)  # type: ignore[arg-type]  # one of LOSSES
    comb = BoltzmannCombination(kT=0.7)
    reference = PartlyUsed()
    per_pose = torch.stack([reference(p).reshape(()) for p in poses])
    loss(comb.value(per_pose), per_pose).backward()
    model = PartlyUsed()
    preds, grad_dict, names, params = _collect(model, poses, allow_unused=True)
    assert any(g is None for g in grad_dict["rare"]) and all(g is None for g in grad_dict["unused"])
    combined, per_pose = comb(preds, grad_dict, names, *params)
    loss(combined, per_pose).backward()
    assert model.unused.grad is None and reference.unused.grad is None  # as autograd
    used = [n for n in names if n != "unused"]
    assert_close(
        [model.get_parameter(n).grad for n in used],
        [reference.get_parameter(n).grad for n in used],
    )


def test_mtenn_grad_dict_of_non_tensors_is_refused_up_front() -> None:
    preds, grad_dict, names, params = _collect(make_mlp(), make_poses(3))
    grad_dict[names[1]][2] = 0.0  # type: ignore[call-overload]  # the wrong type on purpose
    with pytest.raises(combframe.CombinationError, match=r"tensors .*'0.bias'\[2\]: float"):
        MaxCombination()(preds, grad_dict, names, *params)
