"""Core contract: MultiPoseModel and the shipped combinations against the full-graph reference."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from combframe_boltzmann import BoltzmannCombination, BoltzmannCombinationFunc
from combframe_max import MaxCombination, MaxCombinationFunc
from combframe_mean import MeanCombination, MeanCombinationFunc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import combframe
from combframe.testing import LOSSES, full_graph_gradients, make_loss, multipose_gradients
from tests.conftest import make_mlp, make_poses

RTOL = 1e-10

COMBINATIONS = [
    pytest.param(MaxCombination(negate_preds=True, pred_scale=1.0), id="min-t1"),
    pytest.param(MaxCombination(negate_preds=True, pred_scale=30.0), id="min-t30"),
    pytest.param(MaxCombination(negate_preds=True, pred_scale=1000.0), id="min-t1000"),
    pytest.param(MaxCombination(negate_preds=False, pred_scale=1.0), id="max-t1"),
    pytest.param(MaxCombination(negate_preds=False, pred_scale=1000.0), id="max-t1000"),
    pytest.param(MeanCombination(), id="mean"),
    pytest.param(BoltzmannCombination(kT=0.6), id="boltzmann"),
]


def assert_close_per_param(
    got: list[Tensor], want: list[Tensor], names: list[str], rtol: float = RTOL
) -> None:
    scale = max(w.abs().max().item() for w in want)
    for name, g, w in zip(names, got, want, strict=True):
        err = (g - w).abs().max().item() / max(scale, 1e-300)
        assert err <= rtol, f"gradient of {name!r} differs by {err:.3e} relative (> {rtol})"


def param_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("n", [1, 2, 9])
def test_store_matches_full_graph(combination: combframe.Combination, kind: str, n: int) -> None:
    model = make_mlp(seed=n)
    poses = make_poses(n, seed=3)
    loss = make_loss(kind)  # type: ignore[arg-type]
    want_c, want_p, want_g = full_graph_gradients(copy.deepcopy(model), combination, poses, loss)
    got_c, got_p, got_g = multipose_gradients(model, combination, poses, loss, "store")
    torch.testing.assert_close(got_c, want_c, rtol=RTOL, atol=0)
    torch.testing.assert_close(got_p, want_p, rtol=RTOL, atol=0)
    assert_close_per_param(got_g, want_g, param_names(model))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 24),
    name=st.sampled_from(["max", "mean", "boltzmann"]),
    negate=st.booleans(),
    scale=st.sampled_from([1.0, 10.0, 100.0, 1000.0]),
    spread=st.sampled_from([0.0, 1e-3, 1.0, 30.0]),
    kind=st.sampled_from(LOSSES),
    seed=st.integers(0, 2**16),
)
def test_parity_hypothesis(
    n: int, name: str, negate: bool, scale: float, spread: float, kind: str, seed: int
) -> None:
    """Shapes, values (ties at spread 0, wide spread) and losses drawn by hypothesis."""
    params = {"max": {"negate_preds": negate, "pred_scale": scale}, "boltzmann": {"kT": 0.5}}
    combination = combframe.create_combination(name, **params.get(name, {}))
    gen = torch.Generator().manual_seed(seed)
    features = 4
    model = make_mlp(features=features, hidden=6, seed=seed)
    base = torch.randn((1, features), generator=gen, dtype=torch.float64)
    poses = [
        base + spread * torch.randn((1, features), generator=gen, dtype=torch.float64)
        for _ in range(n)
    ]
    loss = make_loss(kind)  # type: ignore[arg-type]
    want_c, _want_p, want_g = full_graph_gradients(copy.deepcopy(model), combination, poses, loss)
    got_c, _got_p, got_g = multipose_gradients(model, combination, poses, loss, "store")
    torch.testing.assert_close(got_c, want_c, rtol=RTOL, atol=1e-300)
    assert_close_per_param(got_g, want_g, param_names(model))


def _mtenn_inputs(
    model: torch.nn.Module, poses: list[Tensor]
) -> tuple[list[Tensor], dict[str, list[Tensor]], list[str], list[Tensor]]:
    """Per-pose predictions and gradients collected the way mtenn's Model does."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    pred_list: list[Tensor] = []
    grad_dict: dict[str, list[Tensor]] = {n: [] for n in names}
    for pose in poses:
        pred = model(pose)
        grads = torch.autograd.grad(pred.sum(), params)
        for name, g in zip(names, grads, strict=True):
            grad_dict[name].append(g.detach().reshape((1, -1)))
        pred_list.append(pred.detach())
    return pred_list, grad_dict, names, params


FUNCS = [
    pytest.param(MaxCombination(True, 25.0), MaxCombinationFunc, (True, 25.0), id="max"),
    pytest.param(MeanCombination(), MeanCombinationFunc, (), id="mean"),
    pytest.param(BoltzmannCombination(0.8), BoltzmannCombinationFunc, (0.8,), id="boltzmann"),
]


@pytest.mark.parametrize(("combination", "func", "hparams"), FUNCS)
@pytest.mark.parametrize("kind", LOSSES)
def test_mtenn_call_and_func_apply_match_reference(
    combination: combframe.Combination,
    func: type[combframe.CombinationFunction],
    hparams: tuple[object, ...],
    kind: str,
) -> None:
    model = make_mlp(seed=5)
    poses = make_poses(6, seed=5)
    loss = make_loss(kind)  # type: ignore[arg-type]
    want_c, want_p, want_g = full_graph_gradients(copy.deepcopy(model), combination, poses, loss)
    for call in ("module", "func"):
        model.zero_grad(set_to_none=True)
        pred_list, grad_dict, names, params = _mtenn_inputs(model, poses)
        if call == "module":
            combined, per_pose = combination(pred_list, grad_dict, names, *params)
        else:
            combined, per_pose = func.apply(*hparams, pred_list, grad_dict, names, *params)
        assert per_pose.shape == (6,)
        torch.testing.assert_close(combined.detach(), want_c, rtol=RTOL, atol=0)
        torch.testing.assert_close(per_pose.detach(), want_p, rtol=RTOL, atol=0)
        loss(combined, per_pose).backward()
        got = [p.grad for p in params]
        assert all(g is not None for g in got), f"{call}: a parameter got no gradient"
        assert_close_per_param(got, want_g, names)  # type: ignore[arg-type]


def test_func_signatures_are_the_documented_ones() -> None:
    def params(f: object) -> list[str]:
        return list(inspect.signature(f.forward).parameters)  # type: ignore[attr-defined]

    assert params(MaxCombinationFunc) == [
        "negate_preds",
        "pred_scale",
        "pred_list",
        "grad_dict",
        "param_names",
        "model_params",
    ]
    assert params(MeanCombinationFunc) == ["pred_list", "grad_dict", "param_names", "model_params"]
    assert params(BoltzmannCombinationFunc)[0] == "kT"
    for f in (MaxCombinationFunc, MeanCombinationFunc, BoltzmannCombinationFunc):
        assert issubclass(f, combframe.CombinationFunction)
        # setup_context and backward are the shared ones, not rewritten per plugin
        assert "setup_context" not in vars(f)
        assert "backward" not in vars(f)


def test_max_attributes_and_defaults() -> None:
    comb = MaxCombination()
    assert comb.negate_preds is True
    assert comb.pred_scale == 1000.0
    comb.pred_scale = 10.0
    assert comb.pred_scale == 10.0
    assert MaxCombination(False, 3.0).negate_preds is False
    assert isinstance(comb, combframe.Combination)
    assert isinstance(comb, combframe.StreamingCombination)
    assert isinstance(comb, torch.nn.Module)
    assert BoltzmannCombination().kT == 1.0


def test_frozen_and_unused_parameters() -> None:
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 1)
            self.unused = torch.nn.Parameter(torch.ones(3))

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.body(x))).sum()

    net = Net().double()
    net.body.weight.requires_grad_(False)
    poses = make_poses(4, features=4)
    model = combframe.MultiPoseModel(net, "max")
    combined, per_pose = model(poses)
    (combined + per_pose.sum()).backward()
    assert net.body.weight.grad is None, "a frozen parameter received a gradient"
    assert net.unused.grad is None, "autograd leaves an unused parameter's .grad None"
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()


@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_two_compounds_accumulate(strategy: str) -> None:
    combination = MaxCombination(True, 5.0)
    loss = make_loss("combined")
    net = make_mlp(seed=2)
    ref = copy.deepcopy(net)
    a, b = make_poses(3, seed=1), make_poses(5, seed=2)
    model = combframe.MultiPoseModel(net, combination, strategy=strategy)
    for poses in (a, b):
        loss(*model(poses)).backward()
    for poses in (a, b):
        per_pose = torch.stack([ref(p).reshape(()) for p in poses])
        loss(combination.value(per_pose), per_pose).backward()
    got = [p.grad for p in net.parameters()]
    want = [p.grad for p in ref.parameters()]
    assert_close_per_param(got, want, param_names(net))  # type: ignore[arg-type]


def test_no_grad_inference_collects_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    net = make_mlp()
    poses = make_poses(5)
    model = combframe.MultiPoseModel(net, "boltzmann")
    with_grad, _ = model(poses)
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k)
    )
    with torch.no_grad():
        combined, per_pose = model(poses)
    with torch.inference_mode():
        combined_inf, _ = model(poses)
    assert calls == [], "per-pose gradients were collected under no_grad"
    assert combined.grad_fn is None and per_pose.grad_fn is None
    torch.testing.assert_close(combined, with_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(combined_inf, with_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 8, 50])
def test_stable_at_large_scale(n: int) -> None:
    """pred_scale=1000 with dG around -15: finite, and within log(N)/t of the true min."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    with torch.no_grad():
        net[0].weight.fill_(0.5)
        net[0].bias.fill_(-15.0)
    gen = torch.Generator().manual_seed(0)
    poses = [torch.randn((1, 3), generator=gen) for _ in range(n)]
    model = combframe.MultiPoseModel(net, MaxCombination(True, 1000.0))
    combined, per_pose = model(poses)
    combined.backward()
    true_min = per_pose.min()
    assert torch.isfinite(combined)
    assert true_min - math.log(n) / 1000.0 - 1e-4 <= combined <= true_min + 1e-4
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_combination_given_by_name_config_or_dict() -> None:
    net = make_mlp()
    for spec in ("max", "MAX", {"name": "max", "pred_scale": 10.0}, MaxCombination(True, 10.0)):
        model = combframe.MultiPoseModel(net, spec)
        assert isinstance(model.combination, MaxCombination)


def test_readouts() -> None:
    net = make_mlp()
    poses = make_poses(4)
    comb = BoltzmannCombination(0.7)
    model = combframe.MultiPoseModel(
        net, comb, pred_readout=lambda y: 2.0 * y - 1.0, comb_readout=torch.exp
    )
    combined, per_pose = model(poses)
    ref = copy.deepcopy(net)
    ref_per_pose = torch.stack([2.0 * ref(p).reshape(()) - 1.0 for p in poses])
    ref_combined = torch.exp(comb.value(ref_per_pose))
    torch.testing.assert_close(per_pose, ref_per_pose.detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(combined.detach(), ref_combined.detach(), rtol=RTOL, atol=0)
    (combined + per_pose.sum()).backward()
    (ref_combined + ref_per_pose.sum()).backward()
    assert_close_per_param(
        [p.grad for p in net.parameters()],  # type: ignore[misc]
        [p.grad for p in ref.parameters()],  # type: ignore[misc]
        param_names(net),
    )


def test_pose_types_dict_and_tuple() -> None:
    class DictNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1).double()

        def forward(self, pose: dict[str, Tensor]) -> Tensor:
            return (self.lin(pose["x"]) * pose["w"]).sum()

    poses = [{"x": torch.randn(5, 3, dtype=torch.float64), "w": torch.rand(5, 1)} for _ in range(3)]
    net = DictNet()
    combined, per_pose = combframe.MultiPoseModel(net, "mean")(poses)
    combined.backward()
    assert per_pose.shape == (3,)
    assert net.lin.weight.grad is not None
