"""Property-based gradient checks.

* Hypothesis draws an installed combination and its parameters, a strategy, N in 1..64,
  per-pose values (ties, widely spread free energies) and a loss mix; the gradients of
  :class:`~combframe.MultiPoseModel` must match the float64 full-graph reference.
* ``torch.autograd.gradcheck`` checks the backward of each combination's Function (the
  plugin ``*Func`` classes with the mtenn signature, and ``CombinationFunction``) in a
  setting where the per-pose gradients are exact functions of the parameters.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

import combframe
from combframe.testing import LOSSES, full_graph_gradients, make_loss, multipose_gradients
from tests.conftest import make_mlp

FEATURES = 4
RTOL = 1e-10

#: Parameters drawn for the shipped combinations; any other installed one uses defaults.
PARAMS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "max": st.fixed_dictionaries(
        {
            "negate_preds": st.booleans(),
            "pred_scale": st.sampled_from([0.05, 1.0, 30.0, 1000.0]),
        }
    ),
    "boltzmann": st.fixed_dictionaries({"kT": st.sampled_from([0.01, 0.6, 1.0, 50.0])}),
}


#: The installed combinations of one value per pose (a pooling one needs vectors).
SCALAR = [n for n in combframe.list_combinations() if not combframe.get_combination_class(n).pools]


@st.composite
def combinations(draw: st.DrawFn) -> combframe.Combination:
    name = draw(st.sampled_from(SCALAR))
    params = draw(PARAMS.get(name, st.just({})))
    return combframe.create_combination(name, **params)


class OffsetNet(torch.nn.Module):
    """``y = mlp(x) + offset``: the offset (last column of the pose) sets the pose's value."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.mlp = make_mlp(FEATURES, hidden=6, seed=seed)

    def forward(self, pose: Tensor) -> Tensor:
        return self.mlp(pose[:, :FEATURES]).sum() + pose[0, FEATURES]


#: Offsets: ties (repeated values), near-ties, typical free energies, and a spread of
#: 200 (with pred_scale=1000 the scaled values reach 1e5: any pose but the best gets
#: weight exp(-1e5) = 0). Much larger |t*y| would test the reference, not combframe:
#: its logsumexp backward loses eps*|t*y| relative accuracy (1e-10 at |t*y| = 5e5),
#: while combframe's softmax weights stay exact.
OFFSETS = st.one_of(
    st.sampled_from([0.0, -7.5, -7.5 + 1e-9]),
    st.floats(-12.0, -2.0),
    st.floats(-100.0, 100.0),
)


@st.composite
def compounds(draw: st.DrawFn) -> list[Tensor]:
    n = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    distinct = draw(st.integers(1, n))  # fewer distinct poses than N: exact ties
    offsets = draw(st.lists(OFFSETS, min_size=distinct, max_size=distinct))
    base = [
        torch.cat(
            [
                torch.randn((1, FEATURES), generator=gen, dtype=torch.float64),
                torch.tensor([[o]], dtype=torch.float64),
            ],
            dim=1,
        )
        for o in offsets
    ]
    return [base[draw(st.integers(0, distinct - 1))] for _ in range(n)]


def relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    scale = max(w.abs().max().item() for w in want)
    diff = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    return diff / scale if scale > 0 else diff


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    combination=combinations(),
    strategy=st.sampled_from(["store", "recompute", "stream"]),
    poses=compounds(),
    kind=st.sampled_from(LOSSES),
    seed=st.integers(0, 100),
)
def test_gradients_match_full_graph_reference(
    combination: combframe.Combination,
    strategy: str,
    poses: list[Tensor],
    kind: str,
    seed: int,
) -> None:
    loss = make_loss(kind)  # type: ignore[arg-type]
    want_c, want_p, want_g = full_graph_gradients(OffsetNet(seed), combination, poses, loss)
    model = OffsetNet(seed)
    if strategy == "stream" and kind != "combined":
        with pytest.raises(combframe.StrategyError, match="combined prediction"):
            multipose_gradients(model, combination, poses, loss, strategy)
        return
    got_c, got_p, got_g = multipose_gradients(model, combination, poses, loss, strategy)
    assert torch.equal(got_p, want_p), "per-pose predictions differ"
    assert relative_error([got_c], [want_c]) <= RTOL
    err = relative_error(got_g, want_g)
    assert err <= RTOL, f"{combination!r}/{strategy}/{kind}/N={len(poses)}: {err:.3e}"


# ---- gradcheck of the Functions -----------------------------------------------------------


class QuadraticPoses:
    r"""Per-pose predictions that are exact functions of the parameters.

    With :math:`v` the concatenation of the parameters :math:`\theta_1` (shape (3,)) and
    :math:`\theta_2` (shape (2, 2)),

    .. math::  y_i(v) = \langle x_i, v\rangle + \tfrac12 v^\top A_i v,
               \qquad \partial y_i/\partial v = x_i + A_i v  \quad (A_i \text{ symmetric}),

    so ``grad_dict`` can be rebuilt from the parameters inside the function under
    test, and a finite difference of the Function's output sees the true
    :math:`h(y(\theta))`.
    """

    shapes = ((3,), (2, 2))
    names = ("theta1", "theta2")

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        size = sum(int(torch.Size(s).numel()) for s in self.shapes)
        self.x = torch.randn((n, size), generator=gen, dtype=torch.float64)
        a = torch.randn((n, size, size), generator=gen, dtype=torch.float64)
        self.a = 0.5 * (a + a.transpose(1, 2))
        self.params = [
            torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in self.shapes
        ]

    def inputs(self, params: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """Detached predictions and mtenn ``grad_dict`` at ``params``."""
        v = torch.cat([p.detach().reshape(-1) for p in params])
        preds = self.x @ v + 0.5 * torch.einsum("j,ijk,k->i", v, self.a, v)
        jac = self.x + self.a @ v  # (N, P): row i is dy_i/dv
        sizes = [p.numel() for p in params]
        grad_dict = {
            name: [row.reshape(p.shape) for row in block]
            for name, p, block in zip(self.names, params, jac.split(sizes, dim=1), strict=True)
        }
        return preds, grad_dict


def _func_classes() -> list[Any]:
    """Each installed combination's mtenn-style ``*Func`` (found in its module)."""
    found = []
    for name in combframe.list_combinations():
        cls = combframe.get_combination_class(name)
        module = sys.modules[cls.__module__]
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, combframe.CombinationFunction) and obj.combination_class is cls:
                found.append(pytest.param(obj, id=obj.__name__))
    return found


GRADCHECK_PARAMS: dict[str, list[dict[str, Any]]] = {
    "max": [
        {"negate_preds": True, "pred_scale": 1.0},
        {"negate_preds": False, "pred_scale": 3.0},
    ],
    "boltzmann": [{"kT": 0.7}, {"kT": 3.0}],
}


def test_every_shipped_combination_has_a_func() -> None:
    names = {p.values[0].combination_class.name for p in _func_classes()}  # type: ignore[union-attr]
    assert {"max", "mean", "boltzmann"} <= names


@pytest.mark.parametrize("func", _func_classes())
@pytest.mark.parametrize("n", [1, 5])
def test_gradcheck_mtenn_func(func: Any, n: int) -> None:
    cls = func.combination_class
    case = QuadraticPoses(n, seed=n)
    for params in GRADCHECK_PARAMS.get(cls.name, [{}]):
        hyper = cls(**params).hyperparameters()

        def run(*theta: Tensor, hyper: tuple[Any, ...] = hyper) -> tuple[Tensor, Tensor]:
            preds, grad_dict = case.inputs(theta)
            out: tuple[Tensor, Tensor] = func.apply(
                *hyper, list(preds.unbind()), grad_dict, list(case.names), *theta
            )
            return out

        assert torch.autograd.gradcheck(run, tuple(case.params), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", SCALAR)
def test_gradcheck_combination_function(name: str) -> None:
    case = QuadraticPoses(4, seed=7)
    for params in GRADCHECK_PARAMS.get(name, [{}]):
        comb = combframe.create_combination(name, **params)

        def run(*theta: Tensor, comb: combframe.Combination = comb) -> tuple[Tensor, Tensor]:
            preds, grad_dict = case.inputs(theta)
            out: tuple[Tensor, Tensor] = combframe.CombinationFunction.apply(
                comb, preds, grad_dict, list(case.names), *theta
            )
            return out

        assert torch.autograd.gradcheck(run, tuple(case.params), eps=1e-6, atol=1e-8)
        # The module call (mtenn's comb(pred_list, grad_dict, param_names, *params)) too.
        assert torch.autograd.gradcheck(
            lambda *t, comb=comb: comb(*case.inputs(t), list(case.names), *t),
            tuple(case.params),
            eps=1e-6,
            atol=1e-8,
        )


def test_gradcheck_catches_a_wrong_backward() -> None:
    """The construction is sensitive: per-pose gradients off by 1% fail gradcheck."""
    case = QuadraticPoses(3, seed=1)
    comb = combframe.create_combination("boltzmann", kT=0.7)

    def wrong(*theta: Tensor) -> tuple[Tensor, Tensor]:
        preds, grad_dict = case.inputs(theta)
        skewed = {k: [1.01 * g for g in v] for k, v in grad_dict.items()}
        out: tuple[Tensor, Tensor] = combframe.CombinationFunction.apply(
            comb, preds, skewed, list(case.names), *theta
        )
        return out

    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(wrong, tuple(case.params), eps=1e-6, atol=1e-8)
