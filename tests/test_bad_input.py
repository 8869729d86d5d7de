"""Bad input: a clear error naming the offending value, and nothing corrupted.

Every test pre-fills the ``.grad`` of every parameter (and, where the model has them,
checks batch-norm buffers) and asserts that after the error they are exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pydantic
import pytest
import torch
from combframe_boltzmann import BoltzmannCombination, BoltzmannCombinationFunc
from combframe_max import MaxCombination, MaxCombinationFunc
from torch import Tensor

import combframe
from combframe import CombinationError
from tests.conftest import make_mlp, make_poses

STRATEGIES = ["store", "recompute", "stream"]


class BatchNormNet(torch.nn.Module):
    """Per-atom features -> batch norm over atoms -> one prediction per pose."""

    def __init__(self, features: int = 5) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(features, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 1)
        self.double()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.out(torch.tanh(self.norm(self.lin(x)))).sum()


@contextmanager
def state_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Pre-fill every ``.grad``; afterwards assert grads and buffers are bit-identical."""
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    yield
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[n]), f".grad of {n!r} changed"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n!r} changed"


def atoms(n: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((4, 5), generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_pose_list(strategy: str) -> None:
    net = make_mlp()
    model = combframe.MultiPoseModel(net, "max", strategy=strategy)
    with state_unchanged(net), pytest.raises(CombinationError, match="poses is empty"):
        model([])


def test_empty_pred_list_in_mtenn_call() -> None:
    net = make_mlp()
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    with state_unchanged(net), pytest.raises(CombinationError, match="pred_list is empty"):
        MaxCombination()([], {n: [] for n in names}, names, *params)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prediction_with_more_than_one_element(strategy: str) -> None:
    # (1, 2, 2): neither one value nor a vector of d values per pose
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Unflatten(1, (2, 2))).double()
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy)
    with state_unchanged(net), pytest.raises(CombinationError, match=r"shape \(1, 2, 2\)"):
        model(make_poses(3))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_poses_of_another_dtype_than_the_model_name_both_and_the_fix(
    strategy: str, chunk_size: int
) -> None:
    """float32 poses into a float64 model used to raise torch's bare "mat1 and mat2 ..."."""
    net = make_mlp()
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=chunk_size)
    poses = [p.float() for p in make_poses(3)]
    match = r"tensors are torch.float32 while its parameters are torch.float64.*pose.to\("
    with state_unchanged(net), pytest.raises(CombinationError, match=match):
        model(poses)
    with torch.no_grad(), pytest.raises(CombinationError, match=match):
        model(poses)
    combined, _ = model([p.double() for p in poses])  # the user's dtypes are never changed
    assert combined.dtype == torch.float64


def test_model_returning_no_tensor() -> None:
    class Bad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1).double()

        def forward(self, x: Tensor) -> float:
            return float(self.lin(x).sum().detach())

    net = Bad()
    with state_unchanged(net), pytest.raises(CombinationError, match="returned float for pose 0"):
        combframe.MultiPoseModel(net, "mean")(make_poses(2))


class Detached(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).sum().detach()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prediction_not_requiring_grad(strategy: str) -> None:
    # recompute, whose forward otherwise runs without a graph, checks its last pose (chunk)
    # with one; store and stream see pose 0 first.
    net = Detached()
    model = combframe.MultiPoseModel(net, "max", strategy=strategy)
    first = 2 if strategy == "recompute" else 0
    with (
        state_unchanged(net),
        pytest.raises(CombinationError, match=f"pose {first} does not require"),
    ):
        model(make_poses(3))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_predictions_name_the_poses(strategy: str) -> None:
    net = BatchNormNet()
    poses = atoms(6)
    poses[2] = poses[2].clone().fill_(math.nan)
    poses[4] = poses[4].clone().fill_(math.inf)
    model = combframe.MultiPoseModel(net, "boltzmann", strategy=strategy)
    with state_unchanged(net), pytest.raises(CombinationError, match=r"at poses \[2, 4\]"):
        model(poses)


def test_check_finite_false_lets_non_finite_through() -> None:
    net = make_mlp()
    poses = make_poses(3)
    poses[1] = poses[1].clone().fill_(math.nan)
    combined, per_pose = combframe.MultiPoseModel(net, "mean", check_finite=False)(poses)
    assert math.isnan(per_pose[1].item()) and math.isnan(combined.item())
    assert math.isfinite(per_pose[0].item())


def mtenn_inputs(n: int) -> tuple[torch.nn.Module, list[Tensor], list[str], list[Tensor]]:
    net = make_mlp()
    names = [name for name, _ in net.named_parameters()]
    params = list(net.parameters())
    preds = [net(p) for p in make_poses(n)]
    return net, [p.detach() for p in preds], names, params


def test_grad_dict_list_length_disagrees_with_pred_list() -> None:
    net, preds, names, params = mtenn_inputs(3)
    grad_dict = {n: [torch.zeros_like(p)] * 3 for n, p in zip(names, params, strict=True)}
    grad_dict[names[1]] = grad_dict[names[1]][:2]
    with state_unchanged(net), pytest.raises(CombinationError, match=rf"'{names[1]}': 2"):
        MaxCombination()(preds, grad_dict, names, *params)
    with state_unchanged(net), pytest.raises(CombinationError, match="must hold 3 gradients"):
        MaxCombinationFunc.apply(True, 1000.0, preds, grad_dict, names, *params)


def test_grad_dict_keys_do_not_match_param_names() -> None:
    net, preds, names, params = mtenn_inputs(2)
    grad_dict = {n: [torch.zeros_like(p)] * 2 for n, p in zip(names, params, strict=True)}
    grad_dict["extra.weight"] = grad_dict.pop(names[0])
    with state_unchanged(net), pytest.raises(CombinationError) as err:
        MaxCombination()(preds, grad_dict, names, *params)
    assert names[0] in str(err.value) and "extra.weight" in str(err.value)


def test_param_names_and_params_disagree_in_number() -> None:
    net, preds, names, params = mtenn_inputs(2)
    grad_dict = {n: [torch.zeros_like(p)] * 2 for n, p in zip(names, params, strict=True)}
    with state_unchanged(net), pytest.raises(CombinationError, match="3 names but 4"):
        MaxCombination()(preds, {k: grad_dict[k] for k in names[:3]}, names[:3], *params)


def test_gradient_of_wrong_size_in_grad_dict() -> None:
    net, preds, names, params = mtenn_inputs(2)
    grad_dict = {n: [torch.zeros_like(p)] * 2 for n, p in zip(names, params, strict=True)}
    grad_dict[names[0]] = [torch.zeros(3, dtype=torch.float64)] * 2
    with state_unchanged(net), pytest.raises(CombinationError, match="has 3 elements"):
        MaxCombination()(preds, grad_dict, names, *params)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_pred_scale_not_positive(scale: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="pred_scale") as err:
        MaxCombination(pred_scale=scale)
    assert "greater than 0" in str(err.value) and str(scale) in str(err.value)
    with pytest.raises(pydantic.ValidationError, match="pred_scale"):
        combframe.create_combination("max", pred_scale=scale)
    net, preds, names, params = mtenn_inputs(2)
    grad_dict = {n: [torch.zeros_like(p)] * 2 for n, p in zip(names, params, strict=True)}
    with state_unchanged(net), pytest.raises(pydantic.ValidationError, match="pred_scale"):
        MaxCombinationFunc.apply(True, scale, preds, grad_dict, names, *params)
    comb = MaxCombination(pred_scale=5.0)
    with pytest.raises(pydantic.ValidationError, match="pred_scale"):
        comb.pred_scale = scale
    assert comb.pred_scale == 5.0, "a rejected assignment must leave the parameter as it was"


@pytest.mark.parametrize("kT", [0.0, -0.5])
def test_kt_not_positive(kT: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="kT") as err:
        BoltzmannCombination(kT=kT)
    assert "greater than 0" in str(err.value)
    net, preds, names, params = mtenn_inputs(2)
    grad_dict = {n: [torch.zeros_like(p)] * 2 for n, p in zip(names, params, strict=True)}
    with state_unchanged(net), pytest.raises(pydantic.ValidationError, match="kT"):
        BoltzmannCombinationFunc.apply(kT, preds, grad_dict, names, *params)
    comb = BoltzmannCombination(kT=2.0)
    with pytest.raises(pydantic.ValidationError, match="kT"):
        comb.kT = kT
    assert comb.kT == 2.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pose_on_another_device_is_refused_before_any_pose_runs(strategy: str) -> None:
    # A meta tensor stands in for a tensor on another device.
    net = BatchNormNet()
    poses = atoms(4)
    poses[3] = poses[3].to("meta")
    model = combframe.MultiPoseModel(net, "max", strategy=strategy)
    with state_unchanged(net), pytest.raises(CombinationError) as err:
        model(poses)
    assert "pose 3" in str(err.value) and "meta" in str(err.value) and "cpu" in str(err.value)
    assert "move_poses=True" in str(err.value)
    assert net.calls == 0, "the model ran on some poses before the bad one was found"


def test_pose_in_a_dict_on_another_device() -> None:
    class DictNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1).double()

        def forward(self, pose: dict[str, Tensor]) -> Tensor:
            return self.lin(pose["x"]).sum()

    net = DictNet()
    poses = [{"x": p} for p in make_poses(2)] + [{"x": make_poses(1)[0].to("meta")}]
    with state_unchanged(net), pytest.raises(CombinationError, match="pose 2 holds a tensor"):
        combframe.MultiPoseModel(net, "mean")(poses)


def test_parameters_on_several_devices_are_refused_by_name() -> None:
    from combframe.core.gradients import ParamLayout

    with pytest.raises(CombinationError, match=r"on cpu, meta\. Move the model"):
        ParamLayout([torch.zeros(2), torch.zeros(2, device="meta")])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pose_dtype_the_model_rejects_leaves_state_alone(strategy: str) -> None:
    # The third pose is float32 while the model is float64: torch raises inside the model,
    # after two poses already updated the batch-norm statistics; they are put back.
    net = BatchNormNet()
    poses = atoms(3)
    poses[2] = poses[2].float()
    model = combframe.MultiPoseModel(net, "max", strategy=strategy)
    match = "pose 2, whose tensors are torch.float32 while its parameters are torch.float64"
    with state_unchanged(net), pytest.raises(CombinationError, match=match):
        model(poses)
    assert net.calls == 3


def test_a_combination_stream_cannot_run_is_refused_when_the_model_is_built() -> None:
    class Median(combframe.Combination):
        """Median of the predictions (no stream terms)."""

        name = "median"

        def value(self, preds: Tensor) -> Tensor:
            return preds.median()

    with pytest.raises(combframe.StrategyError, match="does not support strategy='stream'"):
        combframe.MultiPoseModel(make_mlp(), Median(), strategy="stream")
