r"""The one autograd Function behind every combination.

Forward returns ``(combined, per_pose)``. Backward receives
``comb_grad`` :math:`= \partial L/\partial G` and ``pose_grads``
:math:`= \partial L/\partial y_i`, forms
:math:`c_i = \texttt{comb\_grad}\cdot\partial h/\partial y_i + \texttt{pose\_grads}_i`,
and asks the strategy's :class:`~combframe.core.gradients.PoseGradients` for
:math:`\sum_i c_i\,\partial y_i/\partial\theta`, which it splits back into one
gradient per parameter. A plugin's ``*CombinationFunc`` only changes the leading
arguments (the combination's hyperparameters instead of a combination object); its
``setup_context`` and ``backward`` are these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx
from typing_extensions import override

from combframe.core.gradients import PoseGradients, StoredGradients, validate_grad_dict
from combframe.errors import CombinationError, StrategyError

if TYPE_CHECKING:
    from combframe.core.combination import Combination

__all__ = [
    "AfterPoses",
    "CombinationFunction",
    "OwnParameters",
    "PosePredictions",
    "StreamedPredictions",
    "refuse_second_order",
]

GradSource = Mapping[str, Sequence[Tensor | None]] | PoseGradients
MaybeTensor = Tensor | None
#: A backward's result: one gradient (or None) per input of the Function.
Grads = tuple[Tensor | None, ...]


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


def _keep(ctx: FunctionCtx, state: object) -> None:
    """Attach ``state`` to ``ctx`` for the backward."""
    ctx.state = state  # type: ignore[attr-defined]  # ctx takes any attribute


def _kept(ctx: FunctionCtx) -> Any:
    """Return what :func:`_keep` attached."""
    return ctx.state  # type: ignore[attr-defined]  # set by _keep in setup_context


def _needs(ctx: FunctionCtx) -> tuple[bool, ...]:
    """Return which inputs need a gradient (set by autograd on every ctx)."""
    return tuple(ctx.needs_input_grad)  # type: ignore[attr-defined]  # runtime field of the C++ ctx


class CombinationFunction(torch.autograd.Function):
    r"""Shared custom autograd Function for all combinations.

    ``CombinationFunction.apply(combination, pred_list, grad_dict, param_names, *model_params)``
    takes a combination object. :func:`combframe.mtenn.mtenn_function` derives, for a
    combination class, the subclass whose ``apply`` takes the combination's
    hyperparameters instead, in the order of its ``Params`` fields, exactly as mtenn's
    ``MaxCombinationFunc.apply(negate_preds, pred_scale, pred_list, ...)``.

    ``grad_dict`` is either mtenn's mapping of parameter name to N detached per-pose
    gradients, or a :class:`~combframe.core.gradients.PoseGradients` produced by a strategy.
    """

    #: Set by derived Functions whose forward takes hyperparameters instead of a combination.
    combination_class: ClassVar[type[Combination] | None] = None

    @staticmethod
    @override
    def forward(  # type: ignore[override,unused-ignore]  # setup_context style: no ctx argument
        combination: Combination,
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
    def _unpack(
        cls, inputs: tuple[Any, ...]
    ) -> tuple[int, Combination, GradSource, Sequence[str], tuple[Tensor, ...]]:
        """Split Function inputs into (leading count, combination, grads, names, params)."""
        if cls.combination_class is None:
            lead, combination = 1, inputs[0]
        else:
            lead = len(cls.combination_class.Params.model_fields)
            combination = cls.combination_class(*inputs[:lead])
        _, grad_dict, param_names, *model_params = inputs[lead:]
        return lead, combination, grad_dict, param_names, tuple(model_params)

    @classmethod
    @override
    def setup_context(  # type: ignore[override,unused-ignore]  # a classmethod, to read cls
        cls, ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
    ) -> None:
        lead, combination, grad_dict, param_names, model_params = cls._unpack(inputs)
        combined, preds = output
        needs = _needs(ctx)[lead + 3 :]
        source: PoseGradients | None = None
        if isinstance(grad_dict, PoseGradients):
            source = grad_dict
        elif any(needs) and len(grad_dict):
            source = StoredGradients.from_grad_dict(
                grad_dict, param_names, model_params, preds.shape[0]
            )
        empty = not isinstance(grad_dict, PoseGradients) and len(grad_dict) == 0
        # The pose weights are taken now, with the combination as the forward used it: a
        # hyperparameter changed before backward (a schedule step) must not change them.
        weights = None if source is None else combination.pose_weights(preds, combined)
        _keep(ctx, _MtennState(lead, needs, weights, empty, source))
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, comb_grad: MaybeTensor, pose_grads: MaybeTensor) -> Grads:
        state: _MtennState = _kept(ctx)
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
        return nones + _select(source.prune(source.contract(coeffs)), state.needs)


class OwnParameters(torch.autograd.Function):
    r"""``combined`` unchanged, its gradient also handed to ``local`` (the combination's own).

    ``OwnParameters.apply(combined, local)`` returns ``combined``; ``local`` is
    :math:`h(y; \phi)` computed from the detached predictions, whose graph reaches only
    the combination's parameters :math:`\phi`. Passing :math:`\partial L/\partial G` to
    both gives :math:`\phi` its gradient :math:`\partial L/\partial G \cdot
    \partial h/\partial\phi` and the model's parameters theirs. Build ``local`` before
    the Function that makes ``combined``: autograd then runs that Function's backward
    first, so an error it raises leaves :math:`\phi`'s ``.grad`` untouched.
    """

    @staticmethod
    @override
    def forward(combined: Tensor, local: Tensor) -> Tensor:
        return combined.clone()

    @staticmethod
    @override
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, grad: MaybeTensor) -> Grads:
        return grad, grad


class PosePredictions(torch.autograd.Function):
    r"""The per-pose predictions of a batch of compounds, as one differentiable function.

    ``PosePredictions.apply(source, preds, *inputs)`` returns ``preds`` (the ``(M,)``
    predictions a strategy computed) as a function of ``inputs`` (``source.targets.inputs``:
    parameters and pose tensors). Its backward receives :math:`c = \partial L/\partial y`
    and returns ``source.contract(c)``. Whatever combines the predictions (per compound)
    and the loss are ordinary autograd on the ``M``-vector, so any loss on any mix of
    combined and per-pose predictions is exact.
    """

    @staticmethod
    @override
    def forward(  # type: ignore[override,unused-ignore]  # setup_context style: no ctx argument
        source: PoseGradients, preds: Tensor, *inputs: Tensor
    ) -> Tensor:
        return preds.clone()

    @staticmethod
    @override
    def setup_context(  # type: ignore[override,unused-ignore]  # typed narrower than torch's
        ctx: FunctionCtx, inputs: tuple[Any, ...], output: Tensor
    ) -> None:
        _keep(ctx, inputs[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, coeffs: Tensor | None) -> tuple[Tensor | None, ...]:
        source: PoseGradients = _kept(ctx)
        needs = _needs(ctx)[2:]
        if coeffs is None or not any(needs):
            return (None, None) + (None,) * len(needs)
        refuse_second_order(source.strategy)
        source.check_unchanged()
        grads = source.prune(source.contract(coeffs))
        return (None, None, *_select(grads, needs))


class StreamedPredictions(torch.autograd.Function):
    r"""Combined and per-pose predictions whose gradient comes from running sums (stream).

    ``StreamedPredictions.apply(source, combined, preds, *inputs)`` returns
    ``(combined, preds)``; its backward accepts a gradient on ``combined`` only, which
    ``source.contract_combined`` turns into the inputs' gradients. A non-zero gradient on
    the per-pose predictions cannot be honoured (the sums weight poses by the
    combination's own weights) and raises :class:`~combframe.StrategyError`.

    ``combined`` is :math:`h(y; \phi)` computed from the detached predictions: its own
    graph reaches only the combination's parameters :math:`\phi`, and the backward
    hands it :math:`\partial L/\partial G`, so :math:`\phi` receives
    :math:`\partial L/\partial G \cdot \partial h/\partial\phi` (after the check on
    the per-pose gradient, so a refused loss writes no ``.grad``). The forward gives
    ``combined`` to ``source.settle``.
    """

    @staticmethod
    @override
    def forward(  # type: ignore[override,unused-ignore]  # setup_context style: no ctx argument
        source: PoseGradients, combined: Tensor, preds: Tensor, *inputs: Tensor
    ) -> tuple[Tensor, Tensor]:
        return combined.clone(), preds.clone()

    @staticmethod
    @override
    def setup_context(  # type: ignore[override,unused-ignore]  # typed narrower than torch's
        ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]
    ) -> None:
        source: PoseGradients = inputs[0]
        source.settle(output[0].detach())
        _keep(ctx, source)
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, comb_grad: MaybeTensor, pose_grads: MaybeTensor) -> Grads:
        source: PoseGradients = _kept(ctx)
        own = _needs(ctx)[1]
        needs = _needs(ctx)[3:]
        # Refused before any gradient is returned; the comb_readout's parameters wait for
        # this backward (AfterPoses), and so do the combination's (through ``combined``),
        # so no .grad has been written yet.
        if pose_grads is not None and bool(pose_grads.ne(0).any()):
            raise StrategyError(
                f"the {source.strategy!r} strategy is exact only for losses on the "
                "combined prediction, but the loss also depends on the per-pose "
                "predictions. Use strategy='store' or strategy='recompute' for such losses."
            )
        lead = (None, comb_grad if own else None, None)
        if comb_grad is None or not any(needs):
            return lead + (None,) * len(needs)
        refuse_second_order(source.strategy)
        source.check_unchanged()
        grads = source.prune(source.contract_combined(comb_grad))
        return lead + _select(grads, needs)


def _select(grads: Sequence[Tensor | None], needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """Return the gradients asked for; ``None`` for the rest and the trailing held inputs.

    Inputs past ``grads`` are the outputs of :class:`AfterPoses`: they are inputs only so
    that their backward waits for this one, and get no gradient from it.
    """
    picked = tuple(g if n else None for g, n in zip(grads, needs, strict=False))
    return picked + (None,) * (len(needs) - len(picked))


class AfterPoses(torch.autograd.Function):
    """Identity on some parameters, whose gradients then wait for the pose Function's.

    ``AfterPoses.apply(*params)`` returns views of ``params``. Passed as extra inputs to
    :class:`PosePredictions` or :class:`StreamedPredictions` and used in place of the
    parameters by the ``comb_readout``, they delay the readout's gradient accumulation
    until the pose Function's backward has run: an error that backward raises (a
    per-pose loss under stream, a re-run that differs under recompute) then leaves every
    ``.grad`` of the model and the readout untouched.
    """

    @staticmethod
    @override
    def forward(*params: Tensor) -> tuple[Tensor, ...]:
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    @override
    def setup_context(
        ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Tensor, ...]
    ) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return grads


def refuse_second_order(strategy: str) -> None:
    """Raise if the backward runs with ``create_graph=True`` (a second derivative).

    The per-pose graphs are gone by the time the backward runs, so a gradient of the
    gradient would silently lack the model's second derivatives; refusing is the only
    exact answer.
    """
    if torch.is_grad_enabled():
        raise StrategyError(
            f"a second-order gradient (backward or autograd.grad with create_graph=True, as "
            f"in a gradient penalty) was asked through MultiPoseModel's {strategy!r} "
            "strategy, which keeps no per-pose graph to differentiate again. Compute such a "
            "loss on a full graph of the poses (call the single-pose model on each pose "
            "and combine with combination.value), or leave create_graph off."
        )


def combine_forward(
    combination: Combination,
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
    combined = combination.value(preds)
    return combined, preds


def as_pred_vector(pred_list: Sequence[Tensor] | Tensor) -> Tensor:
    """Stack per-pose predictions into a fresh, detached ``(N,)`` tensor.

    Raises
    ------
    CombinationError
        If there are no predictions, or one of them has more than one element.
    """
    if isinstance(pred_list, Tensor):
        return pred_list.detach().reshape(-1).clone()
    preds = list(pred_list)
    if not preds:
        raise CombinationError("pred_list is empty: a combination needs at least one pose")
    bad = [(i, tuple(p.shape)) for i, p in enumerate(preds) if p.numel() != 1]
    if bad:
        raise CombinationError(
            "each per-pose prediction must have exactly one element; got shapes "
            + ", ".join(f"pose {i}: {s}" for i, s in bad[:5])
        )
    return torch.stack([p.detach().reshape(()) for p in preds])
