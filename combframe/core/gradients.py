r"""Per-pose gradient bookkeeping shared by every combination and strategy.

The backward of every combination needs

.. math::

    \frac{\partial L}{\partial\theta} = \sum_i c_i \frac{\partial y_i}{\partial\theta},
    \qquad c_i = \frac{\partial L}{\partial G}\frac{\partial h}{\partial y_i}
                 + \frac{\partial L}{\partial y_i}.

A :class:`PoseGradients` object knows how to produce that sum for its strategy: from a
stored ``(N, P)`` buffer (one matrix-vector product), by re-running the poses, or from
running sums kept during the forward pass. :class:`ParamLayout` maps between the flat
``P``-vector and the parameter tensors.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import final

import torch
from torch import Tensor
from typing_extensions import override

from combframe.errors import CombinationError, StrategyError

__all__ = [
    "GradTargets",
    "ParamLayout",
    "PoseGradients",
    "StoredGradients",
    "contract_rows",
]


def contract_rows(coeffs: Tensor, rows: Tensor) -> Tensor:
    r"""Return :math:`\sum_{i,l} c_{il}\,J_{il}`: per-pose coefficients times per-pose rows.

    ``coeffs`` is ``(n,)`` (one value per pose) or ``(n, d)`` (a vector output);
    ``rows`` is ``(n, *shape)`` or ``(n, d, *shape)`` (a pose's gradient, or its ``d``
    rows of the Jacobian :math:`\partial y_i/\partial x`). One tensor contraction, in
    ``rows``' dtype; the result has shape ``shape``. The one place every strategy's
    :math:`\sum_i c_i^\top \partial y_i/\partial x` is formed from kept rows.
    """
    out: Tensor = torch.tensordot(coeffs.to(rows.dtype), rows, dims=coeffs.dim())
    return out


@final
class ParamLayout:
    """The flat layout of a list of parameter tensors.

    Parameters
    ----------
    params
        The parameters whose gradients are collected. Their per-pose gradients live in one
        contiguous buffer, in the widest of their dtypes (``torch.promote_types``: a
        float32 model with one float64 parameter keeps float64 rows, so nothing is
        rounded); each parameter gets its gradient back in its own dtype. They must share
        one device.
    device
        Where the (empty) buffers live when there are no parameters.

    Raises
    ------
    CombinationError
        If the parameters are on several devices.
    """

    __slots__ = ("device", "dtype", "numel", "params", "shapes", "sizes")

    def __init__(self, params: Sequence[Tensor], device: torch.device | None = None) -> None:
        self.params = tuple(params)
        self.shapes = tuple(p.shape for p in self.params)
        self.sizes = tuple(p.numel() for p in self.params)
        self.numel = sum(self.sizes)
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            found = ", ".join(sorted(map(str, devices)))
            raise CombinationError(
                "all trainable parameters must be on one device, since their per-pose "
                f"gradients are kept in one buffer; found parameters on {found}. Move the "
                "model with model.to(device) first (a model split across devices is not "
                "supported)."
            )
        first = self.params[0] if self.params else torch.empty(0, device=device)
        dtypes = (p.dtype for p in self.params)
        self.dtype = functools.reduce(torch.promote_types, dtypes, first.dtype)
        self.device = first.device

    def new_buffer(self, rows: int) -> Tensor:
        """Return an uninitialised ``(rows, P)`` buffer in the widest dtype, on the device."""
        return torch.empty((rows, self.numel), dtype=self.dtype, device=self.device)

    def flatten_into(self, grads: Sequence[Tensor], out: Tensor) -> None:
        """Write one pose's parameter gradients into the ``P``-row ``out`` (one kernel)."""
        if not grads:
            return
        torch.cat([g.detach().reshape(-1) for g in grads], out=out)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Split a flat ``P``-vector into parameter-shaped views (no copy, ``flat``'s dtype)."""
        return [
            chunk.view(shape)
            for chunk, shape in zip(flat.split(self.sizes), self.shapes, strict=True)
        ]

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat ``P``-vector into one gradient per parameter, in its own dtype."""
        return self.own_dtypes(self.views(flat))

    def own_dtypes(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Return one gradient per parameter in that parameter's dtype (cast only if not)."""
        return [
            g if g.dtype == p.dtype else g.to(p.dtype)
            for g, p in zip(grads, self.params, strict=True)
        ]


@final
class GradTargets:
    """Everything the gradients of a pose graph go to, in the order of the Function's inputs.

    Parameters
    ----------
    layout
        The trainable parameters (the model's, the readout's and any parameter the pose
        graph reaches through a closure), flattened into one ``P``-vector.
    pose_inputs
        The distinct tensors inside the poses that require grad (positions for forces, the
        output of an upstream encoder). Their gradients are returned to autograd, which
        continues into whatever produced them.
    """

    __slots__ = ("layout", "pose_inputs", "slots")

    def __init__(self, layout: ParamLayout, pose_inputs: Sequence[Tensor] = ()) -> None:
        self.layout = layout
        self.pose_inputs = tuple(pose_inputs)
        self.slots = {id(t): k for k, t in enumerate(self.pose_inputs)}

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """Parameters, then pose tensors: the differentiable inputs of the Function."""
        return self.layout.params + self.pose_inputs

    def __len__(self) -> int:
        return len(self.layout.params) + len(self.pose_inputs)


class PoseGradients(ABC):
    r"""Source of :math:`\sum_i c_i \, \partial y_i/\partial x` for every input :math:`x`.

    Subclasses implement one gradient strategy. ``targets`` lists the inputs (the
    parameters in ``targets.layout`` and the pose tensors that require grad). ``used``,
    when given, holds the ids of the inputs some pose graph reached (it may grow while
    :meth:`contract` re-runs poses); :meth:`prune` gives the others no gradient, as
    autograd leaves the ``.grad`` of a tensor outside the graph ``None``.
    """

    #: Whether per-pose loss terms (a non-zero ``pose_grads``) can be honoured.
    supports_pose_losses: bool = True
    #: Name of the strategy, used in error messages.
    strategy: str = "store"

    def __init__(self, targets: GradTargets | ParamLayout, used: set[int] | None = None) -> None:
        self.targets = targets if isinstance(targets, GradTargets) else GradTargets(targets)
        self.versions = [t._version for t in self.targets.inputs]
        self.used = used
        #: Each pose's tensors, and the version counter of each, flat (see :meth:`watch`).
        self.pose_leaves: Sequence[Sequence[Tensor]] = ()
        self.pose_versions: list[int] = []

    def watch(self, leaves: Sequence[Sequence[Tensor]]) -> None:
        """Note the version counter of every pose tensor, as the forward left it.

        ``leaves`` holds each pose's tensors (as :func:`combframe.core.tree.flatten`
        found them). :meth:`check_unchanged` then refuses a pose tensor changed in place
        before the backward, in every strategy: the gradients kept (or the re-runs made)
        describe the values the forward saw.
        """
        self.pose_leaves = leaves
        self.pose_versions = [t._version for pose in leaves for t in pose]

    def prune(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Give every input no pose graph reached ``None``, and every one reached a tensor.

        A pose graph that reaches an input with weight zero (a pose the smooth minimum
        gives no weight) contributes zeros, as in the full graph, where its ``.grad``
        becomes a tensor of zeros rather than staying ``None``.
        """
        if self.used is None:
            return list(grads)
        used = self.used
        return [
            (torch.zeros_like(t) if g is None else g) if id(t) in used else None
            for g, t in zip(grads, self.targets.inputs, strict=True)
        ]

    def check_unchanged(self) -> None:
        """Raise if an input was modified in place since the forward (as autograd does).

        The gradients kept (or the re-runs made) describe the values of the forward; a
        parameter changed in between (``optimizer.step()`` before ``backward``) would get
        the gradient of values it no longer has.
        """
        inputs = self.targets.inputs
        if [t._version for t in inputs] != self.versions:  # one pass; the culprit if not
            self._input_changed(inputs)
        if [t._version for pose in self.pose_leaves for t in pose] != self.pose_versions:
            self._pose_changed()

    def _input_changed(self, inputs: Sequence[Tensor]) -> None:
        """Raise for the first input whose version counter moved."""
        for k, (t, version) in enumerate(zip(inputs, self.versions, strict=True)):
            if t._version != version:
                what = "parameter" if k < len(self.layout.params) else "pose tensor"
                raise CombinationError(
                    f"a {what} of shape {tuple(t.shape)} that the predictions depend on was "
                    f"modified in place after the forward (version {version} -> "
                    f"{t._version}); its gradient would describe the old values. Call "
                    "backward before changing parameters or poses (optimizer.step() after "
                    "loss.backward())"
                )

    def _pose_changed(self) -> None:
        """Raise for the first pose tensor whose version counter moved."""
        found = ((i, t) for i, pose in enumerate(self.pose_leaves) for t in pose)
        for (i, t), version in zip(found, self.pose_versions, strict=True):
            if t._version != version:
                raise StrategyError(
                    f"a tensor of pose {i} (shape {tuple(t.shape)}) was modified in place "
                    f"after the forward (version {version} -> {t._version}); the gradients "
                    f"the {self.strategy!r} strategy returns describe the values the forward "
                    "saw. Clone the pose before changing it, or call backward first"
                )

    @property
    def layout(self) -> ParamLayout:
        """Layout of the parameters (the flat ``P``-vector)."""
        return self.targets.layout

    @abstractmethod
    def contract(self, coeffs: Tensor) -> list[Tensor | None]:
        r"""Return :math:`\sum_i c_i\,\partial y_i/\partial x` for each input :math:`x`.

        ``coeffs`` has one entry per pose (``(M,)``, or ``(M, d)`` for ``d`` values per
        pose: :math:`\sum_i c_i^\top \partial y_i/\partial x`); the result has one entry per input
        of ``targets.inputs`` (``None`` for a pose tensor no pose depends on).
        """

    def settle(self, combined: Tensor) -> None:
        r"""Take note of the combined predictions :math:`G` (one per compound), in the forward.

        Called once the forward has combined the predictions. A strategy whose backward
        needs :math:`G` and what the combination derives from it (stream's coefficients)
        computes them here, so that the backward uses the combination's parameters as the
        forward did, whatever is changed in between. The default needs nothing.
        """
        return None

    def contract_combined(self, comb_grad: Tensor) -> list[Tensor | None]:
        r"""Return the inputs' gradients for a loss on the combined predictions only.

        ``comb_grad`` is :math:`\partial L/\partial G`, one entry per compound, for the
        :math:`G` given to :meth:`settle`. Only a strategy that keeps per-compound running
        sums instead of per-pose information (stream) implements it.
        """
        raise CombinationError(
            f"the {self.strategy!r} gradient source answers per-pose coefficients only"
        )


@final
class StoredGradients(PoseGradients):
    """Per-pose gradients held in one contiguous ``(M, P)`` buffer (the store strategy).

    Parameters
    ----------
    targets
        The inputs (the buffer's columns are the parameters of ``targets.layout``).
    buffer
        Row ``i`` holds pose ``i``'s flattened parameter gradient.
    pose_rows
        For each pose tensor of ``targets`` (same order): the poses that read it, as a
        ``(k,)`` index, and their gradients with respect to it, stacked ``(k, *shape)``.
    """

    strategy = "store"

    def __init__(
        self,
        targets: GradTargets | ParamLayout,
        buffer: Tensor,
        pose_rows: Sequence[tuple[Tensor, Tensor]] = (),
        used: set[int] | None = None,
    ) -> None:
        super().__init__(targets, used)
        self.buffer = buffer
        self.pose_rows = tuple(pose_rows)

    @override
    def contract(self, coeffs: Tensor) -> list[Tensor | None]:
        flat = contract_rows(coeffs, self.buffer)
        grads: list[Tensor | None] = list(self.layout.unflatten(flat))
        for (rows, stacked), t in zip(self.pose_rows, self.targets.pose_inputs, strict=True):
            grads.append(contract_rows(coeffs[rows], stacked).reshape(t.shape))
        return grads
