r"""The autograd Functions of :class:`~combframe.MultiPoseModel`.

:class:`PosePredictions` (store and recompute) and :class:`StreamedPredictions` (stream)
return the per-pose predictions a strategy computed as a function of the parameters and
pose tensors; their backward asks the strategy's
:class:`~combframe.core.gradients.PoseGradients` for
:math:`\sum_i c_i\,\partial y_i/\partial\theta`, which it splits back into one
gradient per input. :class:`AfterPoses` and :class:`OwnParameters` order the gradients of
the readout's and the combination's own parameters after it. None of them knows a
combination: the combining itself is ordinary autograd on the per-pose predictions.
(mtenn's call has its own Function, :class:`combframe.mtenn.CombinationFunction`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx
from typing_extensions import override

from combframe.core.gradients import PoseGradients
from combframe.errors import StrategyError

__all__ = [
    "AfterPoses",
    "OwnParameters",
    "PosePredictions",
    "StreamedPredictions",
    "keep",
    "kept",
    "needs_input_grad",
    "refuse_second_order",
    "select",
]

MaybeTensor = Tensor | None
#: A backward's result: one gradient (or None) per input of the Function.
Grads = tuple[Tensor | None, ...]


def keep(ctx: FunctionCtx, state: object) -> None:
    """Attach ``state`` to ``ctx`` for the backward."""
    ctx.state = state  # type: ignore[attr-defined]  # ctx takes any attribute


def kept(ctx: FunctionCtx) -> Any:
    """Return what :func:`keep` attached."""
    return ctx.state  # type: ignore[attr-defined]  # set by keep in setup_context


def needs_input_grad(ctx: FunctionCtx) -> tuple[bool, ...]:
    """Return which inputs need a gradient (set by autograd on every ctx)."""
    return tuple(ctx.needs_input_grad)  # type: ignore[attr-defined]  # runtime field of the C++ ctx


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
        keep(ctx, inputs[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, coeffs: Tensor | None) -> tuple[Tensor | None, ...]:
        source: PoseGradients = kept(ctx)
        needs = needs_input_grad(ctx)[2:]
        if coeffs is None or not any(needs):
            return (None, None) + (None,) * len(needs)
        refuse_second_order(source.strategy)
        source.check_unchanged()
        grads = source.prune(source.contract(coeffs))
        return (None, None, *select(grads, needs))


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
        keep(ctx, source)
        ctx.set_materialize_grads(False)

    @staticmethod
    @override
    def backward(ctx: FunctionCtx, comb_grad: MaybeTensor, pose_grads: MaybeTensor) -> Grads:
        source: PoseGradients = kept(ctx)
        own = needs_input_grad(ctx)[1]
        needs = needs_input_grad(ctx)[3:]
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
        return lead + select(grads, needs)


def select(grads: Sequence[Tensor | None], needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
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
