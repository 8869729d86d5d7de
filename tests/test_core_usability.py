"""The core's answers to a first user: dtypes of a combination's layers, the forward's prior
in ``pose_weights``, and messages that name the compound and the shape that is wrong."""

from __future__ import annotations

import pickle

import pydantic
import pytest
import torch
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import Tensor

import combframe
from tests.conftest import make_mlp, make_poses

SIZES = [3, 4]


def _compounds(features: int = 5) -> list[list[Tensor]]:
    poses = make_poses(sum(SIZES), features)
    return [poses[:3], poses[3:]]


class _Vec(torch.nn.Module):
    """A float64 model returning 3 values per pose."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).reshape(-1)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "gated_attention", "dim": 3, "hidden": 4},
        combframe.CombinationConfig(name="gated_attention", dim=3, hidden=4),
    ],
)
def test_a_combination_built_by_name_follows_the_models_dtype(spec: object) -> None:
    model = combframe.MultiPoseModel(_Vec(), spec)
    assert {p.dtype for p in model.combination.parameters()} == {torch.float64}
    out = model(compounds=_compounds())
    assert out.combined.shape == (2, 3) and out.combined.dtype == torch.float64


@pytest.mark.cuda
def test_a_combination_built_by_name_follows_the_models_device() -> None:
    net = _Vec().cuda()
    model = combframe.MultiPoseModel(net, {"name": "gated_attention", "dim": 3, "hidden": 4})
    assert {p.device.type for p in model.combination.parameters()} == {"cuda"}
    compounds = [[p.cuda() for p in c] for c in _compounds()]
    assert model(compounds=compounds).combined.device.type == "cuda"


def test_a_combination_module_of_another_dtype_is_refused_before_any_pose_runs() -> None:
    comb = combframe.create_combination("gated_attention", dim=3, hidden=4)  # float32
    with pytest.raises(combframe.CombinationError) as err:
        combframe.MultiPoseModel(_Vec(), comb)
    text = str(err.value)
    assert "torch.float32" in text and "torch.float64" in text
    assert "comb.to(torch.float64)" in text and "model.double()" in text
    model = combframe.MultiPoseModel(_Vec(), comb.double())  # the fix the message names
    assert model(compounds=_compounds()).combined.shape == (2, 3)


def test_a_learned_scalar_of_another_dtype_is_refused_too() -> None:
    comb = combframe.create_combination("boltzmann", learn=["kT"])  # float32 kT
    with pytest.raises(combframe.CombinationError, match=r"float32.*float64"):
        combframe.MultiPoseModel(make_mlp(), comb)


def _prior_and_mask() -> tuple[Tensor, Tensor]:
    prior = torch.linspace(-1.0, 1.0, sum(SIZES), dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    return prior, mask


@pytest.mark.parametrize("name", ["max", "mean", "boltzmann"])
def test_pose_weights_of_the_forwards_result_use_its_prior_and_mask(name: str) -> None:
    model = combframe.MultiPoseModel(make_mlp(), name)
    prior, mask = _prior_and_mask()
    out = model(compounds=_compounds(), prior=prior, mask=mask)
    expected = model.pose_weights(out.per_pose, out.index, prior=prior, mask=mask)
    got = model.pose_weights(out)
    torch.testing.assert_close(got, expected)
    assert got[~mask].abs().max() == 0
    # the full graph: the weight of a pose is dG/dy with the same prior and mask
    y = out.per_pose.detach().requires_grad_(True)
    logp = prior.masked_fill(~mask, -torch.inf)
    combined = model.combination.segment_value(y, out.index, len(SIZES), prior=logp)
    (reference,) = torch.autograd.grad(combined.sum(), y)
    torch.testing.assert_close(got, reference)
    # a prior or mask given here replaces the forward's
    every = torch.ones(7, dtype=torch.bool)
    plain = model.pose_weights(out.per_pose, out.index, mask=every)
    torch.testing.assert_close(model.pose_weights(out, mask=every), plain)


def test_pose_weights_of_the_forwards_tensors_use_its_prior() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "mean")
    prior, mask = _prior_and_mask()
    out = model(compounds=_compounds(), prior=prior, mask=mask)
    torch.testing.assert_close(model.pose_weights(out.per_pose, out.index), model.pose_weights(out))
    other = out.per_pose.detach().clone()  # not the call's own: no prior
    assert model.pose_weights(other, out.index)[~mask].min() > 0


def test_pose_weights_of_a_one_compound_call_use_its_prior() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "mean")
    prior, mask = _prior_and_mask()
    _, per_pose = model(make_poses(4), prior=prior[3:], mask=mask[3:])
    expected = model.pose_weights(per_pose, prior=prior[3:], mask=mask[3:])
    torch.testing.assert_close(model.pose_weights(per_pose), expected)
    assert model.pose_weights(per_pose)[-1] == 0  # the masked pose
    pickle.loads(pickle.dumps(model))  # the remembered prior is not part of the state


def test_pose_weights_refuse_a_result_and_an_index() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "mean")
    out = model(compounds=_compounds())
    with pytest.raises(TypeError, match="CompoundPredictions"):
        model.pose_weights(out, out.index)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"prior": [torch.zeros(3), torch.zeros(5)]},
            r"compound 1 has 4 poses but \(5,\)",
        ),
        ({"mask": [torch.ones(3, dtype=torch.bool)]}, "1 tensors .* 2 compounds"),
        ({"prior": torch.zeros(7, 3)}, r"one value per pose, a flat \(7,\) tensor, not one per"),
        ({"mask": torch.tensor([1, 1, 1, 0, 0, 0, 0]).bool()}, r"compounds \[1\]"),
        ({"prior": torch.tensor([0, 0, 0, 0, float("nan"), 0, 0])}, r"at poses \[4\]"),
    ],
)
def test_prior_and_mask_messages_name_what_is_wrong(kw: dict[str, object], message: str) -> None:
    model = combframe.MultiPoseModel(make_mlp(), "max")
    with pytest.raises(combframe.CombinationError, match=message):
        model(compounds=_compounds(), **kw)  # type: ignore[arg-type]  # the wrong inputs


BAD_PARAMETERS = [
    lambda: combframe.create_combination("gated_attention", dim=-1),
    lambda: combframe.create_combination({"name": "boltzmann", "kT": 0}),
    lambda: combframe.create_combination("max", pred_scael=5),
    lambda: combframe.MultiPoseModel(make_mlp(), {"name": "gated_attention", "dim": 0}),
    lambda: combframe.get_combination_class("boltzmann")(kT=float("inf")),
]


@pytest.mark.parametrize("make", BAD_PARAMETERS)
def test_bad_parameters_are_a_combframe_error_and_a_validation_error(make: object) -> None:
    with pytest.raises(combframe.InvalidParametersError) as err:
        make()  # type: ignore[operator]  # each entry is a callable
    assert isinstance(err.value, combframe.CombframeError)
    assert isinstance(err.value, combframe.CombinationError)
    assert isinstance(err.value, pydantic.ValidationError)
    assert isinstance(err.value, ValueError)
    assert err.value.errors()[0]["loc"] and str(err.value).count("validation error") == 1


def test_a_refused_assignment_raises_both_and_keeps_the_old_value() -> None:
    comb = combframe.create_combination("max", pred_scale=2.0)
    with pytest.raises(pydantic.ValidationError, match="pred_scale"):
        comb.pred_scale = -1.0
    with pytest.raises(combframe.CombframeError, match="pred_scale"):
        comb.pred_scale = -1.0
    assert comb.pred_scale == 2.0


def test_a_custom_pydantic_error_keeps_its_message() -> None:
    details = InitErrorDetails(
        type=PydanticCustomError("my_check", "dim {x} must be even", {"x": 3}),
        loc=("dim",),
        input=3,
    )
    original = pydantic.ValidationError.from_exception_data("P", [details])
    again = combframe.InvalidParametersError.of(original)
    assert again.errors()[0]["msg"] == original.errors()[0]["msg"] == "dim 3 must be even"
    assert again.errors()[0]["loc"] == ("dim",)
