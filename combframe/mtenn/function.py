r"""mtenn's call: ``comb(pred_list, grad_dict, param_names, *model_params)`` and its Function.

mtenn hands a combination the per-pose predictions and, per parameter, the N per-pose
gradients :math:`\partial y_i/\partial\theta` it computed itself. :class:`CombinationFunction`
turns them into one ``(N, P)`` buffer (a :class:`~combframe.core.gradients.StoredGradients`)
and, in its backward, forms
:math:`c_i = \texttt{comb\_grad}\cdot\partial h/\partial y_i + \texttt{pose\_grads}_i`
and contracts the buffer with it. The Function knows no combination class: it asks the
object it is given for two things, :meth:`~WeightedCombination.value` and
:meth:`~WeightedCombination.pose_weights`. :func:`mtenn_function` derives, for a
combination class, mtenn's ``<Class>Func`` whose ``apply`` takes the hyperparameters
instead of the object.

The registry installs :func:`mtenn_call` in the core
(:func:`combframe.core.combination.set_mtenn_call`), so that every
:class:`~combframe.Combination` answers mtenn's call; the core does not import this module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx
from typing_extensions import override

from combframe.core.function import (
    OwnParameters,
    keep,
    kept,
    needs_input_grad,
    refuse_second_order,
    select,
)
from combframe.core.gradients import ParamLayout, PoseGradients, StoredGradients
from combframe.errors import CombinationError

__all__ = [
    "CombinationFunction",
    "WeightedCombination",
    "as_pred_vector",
    "mtenn_call",
    "mtenn_function",
    "stored_gradients",
    "validate_grad_dict",
]

GradSource = Mapping[str, Sequence[Tensor | None]] | PoseGradients
MaybeTensor = Tensor | None


class WeightedCombination(Protocol):
    """What the Functions need of a combination: its value and its pose weights."""

    def value(self, preds: Tensor) -> Tensor:
        r"""Return :math:`h(y)` (0-d) for the ``(N,)`` predictions."""
        ...

    def pose_weights(self, preds: Tensor, combined: Tensor) -> Tensor:
        r"""Return :math:`\partial h/\partial y_i`, shape ``(N,)``."""
        ...


@dataclass(frozen=True)
class _MtennState:
    """What :class:`CombinationFunction`'s backward needs from its forward."""

    lead: int
    needs: tuple[bool, ...]
    #: The pose weights dh/dy_i, computed in the forward (its hyperparameters); None
    #: when no gradient can be asked for.
    weights: Tensor | None
    empty: bool
    source: PoseGradients | None


class CombinationFunction(torch.autograd.Function):
    r"""The autograd Function of mtenn's call, shared by every combination.

    ``CombinationFunction.apply(combination, pred_list, grad_dict, param_names, *model_params)``
    takes any object with ``value`` and ``pose_weights`` (:class:`WeightedCombination`).
    :func:`mtenn_function` derives, for a combination class, the subclass whose ``apply``
    takes the combination's hyperparameters instead, in the order of its ``Params``
    fields, exactly as mtenn's ``MaxCombinationFunc.apply(negate_preds, pred_scale,
    pred_list, ...)``.

    ``grad_dict`` is either mtenn's mapping of parameter name to N detached per-pose
    gradients, or a :class:`~combframe.core.gradients.PoseGradients` produced by a strategy.
    """

    #: Set by derived Functions whose forward takes hyperparameters instead of a combination:
    #: builds the combination from them.
    combination_class: ClassVar[Callable[..., WeightedCombination] | None] = None
    #: How many hyperparameters lead the derived Function's inputs.
    lead: ClassVar[int] = 1

    @staticmethod
    @override
    def forward(  # type: ignore[override,unused-ignore]  # setup_context style: no ctx argument
        combination: WeightedCombination,
        pred_list: Sequence[Tensor] | Tensor,
        grad_dict: GradSource,
        param_names: Sequence[str],
        *model_params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        return combine_forward(combination, pred_list, grad_dict, param_names, model_params)

    @classmethod
    def call(cls, *inputs: Any) -> tuple[Tensor, Tensor]:
        """``apply`` with its result typed (``(combined, per_pose)``)."""
        out: tuple[Tensor, Tensor] = cls.apply(*inputs)  # type: ignore[no-untyped-call]  # untyped in torch
        return out

    @classmethod
    def _combination(cls, inputs: tuple[Any, ...]) -> WeightedCombination:
        """Return the combination the inputs describe (given, or built from hyperparameters)."""
        if cls.combination_class is None:
            combination: WeightedCombination = inputs[0]
            return combination
        return cls.combination_class(*inputs[: cls.lead])

    @classmethod
    @override
    def setup_context(  # type: ignore[override,unused-ignore]  # a classmethod, to read cls
        cls, ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
    ) -> None:
        _, grad_dict, param_names, *model_params = inputs[cls.lead :]
        combined, preds = output
        needs = needs_input_grad(ctx)[cls.lead + 3 :]
        source: PoseGradients | None = None
        if isinstance(grad_dict, PoseGradients):
            source = grad_dict
        elif any(needs) and len(grad_dict):
            source = stored_gradients(grad_dict, param_names, model_params, preds.shape[0])
        empty = not isinstance(grad_dict, PoseGradients) and len(grad_dict) == 0
        # The pose weights are taken now, with the combination as the forward used it: a
        # hyperparameter changed before backward (a schedule step) must not change them.
        weights = None
        if source is not None:
            weights = cls._combination(inputs).pose_weights(preds, combined)
        keep(ctx, _MtennState(cls.lead, needs, weights, empty, source))
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(
        ctx: FunctionCtx, comb_grad: MaybeTensor, pose_grads: MaybeTensor
    ) -> tuple[Tensor | None, ...]:
        state: _MtennState = kept(ctx)
        nones: tuple[None, ...] = (None,) * (state.lead + 3)
        asked = any(state.needs) and (comb_grad is not None or pose_grads is not None)
        if asked and state.empty:
            raise CombinationError(
                "the combination was called with an empty grad_dict (as mtenn does when "
                "nothing needs gradients), but a gradient of its result was then asked "
                "for; pass the per-pose gradients of the parameters in grad_dict, or run "
                "the forward under torch.no_grad()"
            )
        source = state.source
        if source is None or not asked:
            return nones + (None,) * len(state.needs)
        refuse_second_order(source.strategy)
        source.check_unchanged()
        coeffs: Tensor | None = None
        if comb_grad is not None:
            assert state.weights is not None, "taken in the forward whenever there is a source"
            coeffs = comb_grad * state.weights
        if pose_grads is not None:
            coeffs = pose_grads if coeffs is None else coeffs + pose_grads
        assert coeffs is not None
        return nones + select(source.prune(source.contract(coeffs)), state.needs)


def mtenn_call(
    combination: Any,
    pred_list: Sequence[Tensor] | Tensor,
    grad_dict: GradSource,
    param_names: Sequence[str],
    *model_params: Tensor,
) -> tuple[Tensor, Tensor]:
    """Run mtenn's call on a combination module (what ``Combination.forward`` runs).

    The combination's own trainable parameters (an ``nn.Parameter`` it holds) get their
    gradient through :class:`~combframe.core.function.OwnParameters`.
    """
    local: Tensor | None = None
    if torch.is_grad_enabled() and any(p.requires_grad for p in combination.parameters()):
        # h on the detached predictions, built before the Function (see OwnParameters)
        local = combination.value(as_pred_vector(pred_list))
    combined, per_pose = CombinationFunction.call(
        combination, pred_list, grad_dict, param_names, *model_params
    )
    if local is not None:
        combined = OwnParameters.apply(combined, local)  # type: ignore[no-untyped-call]  # untyped in torch
    return combined, per_pose


def mtenn_function(cls: type[Any]) -> type[CombinationFunction]:
    """Return mtenn's ``<Class>Func`` autograd Function for the combination class ``cls``.

    Its ``apply(*hyperparameters, pred_list, grad_dict, param_names, *model_params)``
    takes ``cls``'s parameters positionally in ``Params`` field order and returns
    ``(combined, per_pose)``, as mtenn's ``MaxCombinationFunc.apply(negate_preds,
    pred_scale, pred_list, grad_dict, param_names, *model_params)`` does; forward,
    setup_context and backward are :class:`CombinationFunction`'s.
    """
    fields = list(cls.Params.model_fields)
    lead = len(fields)

    def forward(*inputs: Any) -> tuple[Tensor, Tensor]:
        pred_list, grad_dict, param_names = inputs[lead : lead + 3]
        combination = cls(*inputs[:lead])
        return combine_forward(combination, pred_list, grad_dict, param_names, inputs[lead + 3 :])

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    names = [*fields, "pred_list", "grad_dict", "param_names"]
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # read by inspect
        [inspect.Parameter(n, kind) for n in names]
        + [inspect.Parameter("model_params", inspect.Parameter.VAR_POSITIONAL)]
    )
    listed = "".join(f"{f}, " for f in fields)
    return type(
        f"{cls.__name__}Func",
        (CombinationFunction,),
        {
            "__module__": cls.__module__,
            "__doc__": f"mtenn-compatible Function of :class:`{cls.__name__}`: "
            f"``apply({listed}pred_list, grad_dict, param_names, *model_params)``.",
            "combination_class": cls,
            "lead": lead,
            "forward": staticmethod(forward),
        },
    )


def combine_forward(
    combination: WeightedCombination,
    pred_list: Sequence[Tensor] | Tensor,
    grad_dict: GradSource,
    param_names: Sequence[str],
    model_params: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """Validate the inputs and compute ``(h(y), y)``; shared by every Function's forward."""
    preds = as_pred_vector(pred_list)
    if not isinstance(grad_dict, PoseGradients):
        # An empty grad_dict is mtenn's way of saying that nothing needs gradients
        # (no_grad, inference_mode, eval): the value alone is asked for.
        if len(grad_dict):
            validate_grad_dict(grad_dict, param_names, model_params, preds.shape[0])
    elif grad_dict.layout.params and len(grad_dict.layout.params) != len(model_params):
        raise CombinationError(
            f"the gradient source holds {len(grad_dict.layout.params)} parameters but "
            f"{len(model_params)} were passed"
        )
    return combination.value(preds), preds


#: Why the mtenn-style call refuses vector predictions, and what to use instead.
_SCALAR_ONLY = (
    "mtenn's call combines one value per pose; for d values per pose (several targets, "
    "an embedding to pool) use combframe.MultiPoseModel, whose strategies take (N, d) "
    "predictions"
)


def as_pred_vector(pred_list: Sequence[Tensor] | Tensor) -> Tensor:
    """Stack per-pose predictions into a fresh, detached ``(N,)`` tensor.

    Raises
    ------
    CombinationError
        If there are no predictions, or one of them has more than one element (mtenn's
        call is scalar: vector outputs go through :class:`~combframe.MultiPoseModel`).
    """
    if isinstance(pred_list, Tensor):
        if pred_list.dim() > 1 and pred_list.numel() != pred_list.shape[0]:
            raise CombinationError(
                f"pred_list has shape {tuple(pred_list.shape)}: d > 1 values per pose. "
                + _SCALAR_ONLY
            )
        return pred_list.detach().reshape(-1).clone()
    preds = list(pred_list)
    if not preds:
        raise CombinationError("pred_list is empty: a combination needs at least one pose")
    bad = [(i, tuple(p.shape)) for i, p in enumerate(preds) if p.numel() != 1]
    if bad:
        raise CombinationError(
            "each per-pose prediction must have exactly one element; got shapes "
            + ", ".join(f"pose {i}: {s}" for i, s in bad[:5])
            + ". "
            + _SCALAR_ONLY
        )
    return torch.stack([p.detach().reshape(()) for p in preds])


def stored_gradients(
    grad_dict: Mapping[str, Sequence[Tensor | None]],
    param_names: Sequence[str],
    model_params: Sequence[Tensor],
    n_poses: int,
) -> StoredGradients:
    """Build the buffer from mtenn's ``{name: [N gradients]}``, after validating it.

    A ``None`` gradient (what ``torch.autograd.grad(..., allow_unused=True)`` gives
    for a parameter the pose's prediction does not depend on) counts as zeros, as
    autograd counts it; a parameter whose gradients are all ``None`` gets no
    gradient (``.grad`` stays ``None``), as with autograd.

    Raises
    ------
    CombinationError
        As :func:`validate_grad_dict`, or if a gradient has the wrong number of
        elements for its parameter.
    """
    validate_grad_dict(grad_dict, param_names, model_params, n_poses)
    layout = ParamLayout(model_params)
    for name, p in zip(param_names, model_params, strict=True):
        bad = [
            (i, g.numel())
            for i, g in enumerate(grad_dict[name])
            if g is not None and g.numel() != p.numel()
        ]
        if bad:
            raise CombinationError(
                f"gradient {bad[0][0]} of {name!r} has {bad[0][1]} elements; the "
                f"parameter has {p.numel()}"
            )
    used = {
        id(p)
        for n, p in zip(param_names, model_params, strict=True)
        if any(g is not None for g in grad_dict[n])
    }
    if not model_params:
        return StoredGradients(layout, layout.new_buffer(n_poses), used=used)
    buffer = torch.cat(
        [
            torch.stack(
                [
                    p.new_zeros(p.numel()) if g is None else g.detach().reshape(-1)
                    for g in grad_dict[n]
                ]
            ).to(layout.dtype)
            for n, p in zip(param_names, model_params, strict=True)
        ],
        dim=1,
    )
    return StoredGradients(layout, buffer, used=used)


def validate_grad_dict(
    grad_dict: Mapping[str, Sequence[Tensor | None]],
    param_names: Sequence[str],
    model_params: Sequence[Tensor],
    n_poses: int,
) -> None:
    """Check mtenn-style gradients against the names, parameters and number of poses.

    Raises
    ------
    CombinationError
        If names and parameters disagree in number, keys are missing or extra, a
        list does not hold ``n_poses`` gradients, or an entry is neither a tensor nor
        ``None``.
    """
    names = list(param_names)
    if len(names) != len(model_params):
        raise CombinationError(
            f"param_names has {len(names)} names but {len(model_params)} model_params "
            "were given; pass one name per parameter, in the same order"
        )
    missing = [n for n in names if n not in grad_dict]
    extra = [k for k in grad_dict if k not in set(names)]
    if missing or extra:
        raise CombinationError(
            f"grad_dict keys do not match param_names: missing {missing[:5]}, extra {extra[:5]}"
        )
    wrong = [(n, len(grad_dict[n])) for n in names if len(grad_dict[n]) != n_poses]
    if wrong:
        raise CombinationError(
            f"grad_dict must hold {n_poses} gradients per parameter (one per prediction "
            "in pred_list); got " + ", ".join(f"{n!r}: {k}" for n, k in wrong[:5])
        )
    odd = [
        (n, i, type(g).__name__)
        for n in names
        for i, g in enumerate(grad_dict[n])
        if g is not None and not isinstance(g, Tensor)
    ]
    if odd:
        raise CombinationError(
            "grad_dict must hold tensors (or None for a parameter a pose does not use, as "
            "torch.autograd.grad(..., allow_unused=True) gives); got "
            + ", ".join(f"{n!r}[{i}]: {t}" for n, i, t in odd[:5])
        )
