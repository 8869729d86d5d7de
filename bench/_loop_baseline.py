r"""The per-parameter Python-loop baseline, written from the math.

This is the published approach: collect each pose's gradient into a dictionary of lists
(parameter name to N gradients), then form
:math:`\partial L/\partial\theta = \sum_i c_i\,\partial y_i/\partial\theta` with a
Python loop over parameters and poses. It exists only to be measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def collect_grad_dict(
    model: nn.Module, poses: Sequence[Tensor]
) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Per-pose predictions and ``{name: [N per-pose gradients]}``, one graph at a time."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grad_dict: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    preds = []
    for pose in poses:
        pred = model(pose).reshape(())
        grads = torch.autograd.grad(pred, [p for _, p in named])
        for (name, _), g in zip(named, grads, strict=True):
            grad_dict[name].append(g.detach())
        preds.append(pred.detach())
    return torch.stack(preds), grad_dict


def loop_combine(grad_dict: dict[str, list[Tensor]], coeffs: Tensor) -> dict[str, Tensor]:
    r""":math:`\sum_i c_i g_i` per parameter, by a loop over parameters and poses."""
    out = {}
    for name, grads in grad_dict.items():
        total = torch.zeros_like(grads[0])
        for i, g in enumerate(grads):
            total += coeffs[i] * g
        out[name] = total
    return out


def loop_step(
    model: nn.Module, combination: nn.Module, poses: Sequence[Tensor], loss: LossFn
) -> Tensor:
    """One training step (gradients left in ``.grad``) the published way; returns the loss."""
    model.zero_grad(set_to_none=True)
    preds, grad_dict = collect_grad_dict(model, poses)
    return loop_backward(model, combination, preds, grad_dict, loss)


def loop_backward(
    model: nn.Module,
    combination: nn.Module,
    preds: Tensor,
    grad_dict: dict[str, list[Tensor]],
    loss: LossFn,
) -> Tensor:
    """The published backward from collected gradients: ``c`` by autograd, the loop, ``.grad``."""
    y = preds.clone().requires_grad_(True)
    value = loss(combination.value(y), y)  # type: ignore[operator]
    (coeffs,) = torch.autograd.grad(value, y)  # c_i = dL/dy_i through h and the pose terms
    totals = loop_combine(grad_dict, coeffs)
    for name, p in model.named_parameters():
        if name in totals:
            p.grad = totals[name]
    return value.detach()
