"""``MultiPoseModel``: a single-pose model, a combination and a gradient strategy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from combframe._combination import BaseCombination
from combframe._errors import CombinationError
from combframe._function import CombinationFunction
from combframe._strategies import PoseRunner, Strategy, resolve_strategy

__all__ = ["MultiPoseModel"]


class MultiPoseModel(torch.nn.Module):
    """Combine a single-pose model's predictions over the poses of one compound.

    Only one pose's autograd graph is alive at a time; gradients of the combined and the
    per-pose predictions reach the model's parameters exactly, through the shared
    :class:`~combframe.CombinationFunction`.

    Parameters
    ----------
    model
        Single-pose model: ``model(pose)`` returns a tensor with one element.
    combination
        A combination module, a registered name (``"max"``), a
        :class:`~combframe.CombinationConfig` or a ``{"name": ..., **params}`` dict.
    strategy
        ``"store"`` (default), ``"recompute"``, ``"stream"``, or a
        :class:`~combframe.Strategy` instance such as ``Recompute(check=True)``.
    pred_readout
        Applied to each pose's prediction before combining (part of the per-pose graph).
    comb_readout
        Applied to the combined prediction.
    check_finite
        Raise if a per-pose prediction is NaN or infinite, naming the poses (one device
        sync per compound). Set ``False`` to skip the check.
    move_poses
        Move tensors in the poses to the model's device instead of raising on a mismatch.

    Notes
    -----
    Every pose is checked before the model runs on any of them: its tensors must be on
    the model's device (unless ``move_poses``). All trainable parameters must share one
    dtype (their per-pose gradients share one buffer). The per-pose predictions are
    combined in the parameters' dtype (under autocast the model's output, say bfloat16,
    is promoted first), and gradients reach the parameters in their own dtype. In
    training mode the model's buffers are snapshotted for the duration of ``forward``
    and put back if it raises, so a bad pose never leaves half-updated batch-norm
    statistics behind.

    Examples
    --------
    >>> import torch, combframe
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    >>> model = combframe.MultiPoseModel(net, "mean")
    >>> combined, per_pose = model([torch.ones(1, 3), torch.zeros(1, 3)])
    >>> per_pose.shape
    torch.Size([2])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        combination: Any,
        *,
        strategy: str | Strategy = "store",
        pred_readout: Callable[[Tensor], Tensor] | None = None,
        comb_readout: Callable[[Tensor], Tensor] | None = None,
        check_finite: bool = True,
        move_poses: bool = False,
    ) -> None:
        super().__init__()
        from combframe._registry import resolve_combination

        self.model = model
        self.combination: BaseCombination = resolve_combination(combination)
        self.strategy = resolve_strategy(strategy)
        self.pred_readout = pred_readout
        self.comb_readout = comb_readout
        self.check_finite = check_finite
        self.move_poses = move_poses

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}"

    def _trainable(self) -> tuple[list[str], list[Tensor]]:
        named = list(self.model.named_parameters(prefix="model"))
        if isinstance(self.pred_readout, torch.nn.Module):
            named += list(self.pred_readout.named_parameters(prefix="pred_readout"))
        seen: set[int] = set()
        names: list[str] = []
        params: list[Tensor] = []
        for name, p in named:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.append(name)
                params.append(p)
        return names, params

    def _device(self, params: Sequence[Tensor]) -> torch.device:
        for t in params:
            return t.device
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def forward(self, poses: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Predict one compound from its poses.

        Parameters
        ----------
        poses
            The compound's poses; each is passed to the single-pose model as it is
            (a tensor, dict, tuple or any object the model accepts).

        Returns
        -------
        combined, per_pose
            The combined prediction (0-d tensor) and the per-pose predictions (shape
            ``(N,)``), both differentiable with respect to the model's parameters.

        Raises
        ------
        CombinationError
            If ``poses`` is empty, a prediction does not have exactly one element, does
            not depend on a trainable parameter, is not finite (with ``check_finite``),
            or a pose is on another device than the model (checked for every pose
            before the model runs). After any error, ``.grad`` fields and buffers are
            as they were before the call.
        """
        if isinstance(poses, Tensor | dict) or not isinstance(poses, Sequence):
            poses = list(poses) if not isinstance(poses, dict) else [poses]
        if len(poses) == 0:
            raise CombinationError(
                "poses is empty: a compound needs at least one pose to be predicted"
            )
        names, params = self._trainable()
        device = self._device(params)
        runner = PoseRunner(self.model, self.pred_readout, params, self.move_poses, device)
        runner.check_devices(poses)
        snapshot = self._snapshot_buffers()
        try:
            combined, per_pose = self._combine(runner, poses, names, params)
        except BaseException:
            if snapshot:
                torch._foreach_copy_([b for b, _ in snapshot], [c for _, c in snapshot])
            raise
        if self.comb_readout is not None:
            combined = self.comb_readout(combined)
        return combined, per_pose

    def _combine(
        self, runner: PoseRunner, poses: Sequence[Any], names: list[str], params: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and params:
            preds, source = self.strategy.collect(runner, poses, self.combination)
            preds = self._promote(preds, params[0].dtype)
            self._check_finite(preds)
            out: tuple[Tensor, Tensor] = CombinationFunction.apply(  # type: ignore[no-untyped-call]
                self.combination, preds, source, names, *params
            )
            return out
        with torch.no_grad():
            preds = torch.stack([runner.predict(i, pose) for i, pose in enumerate(poses)])
            if params:
                preds = self._promote(preds, params[0].dtype)
            self._check_finite(preds)
            return self.combination.value(preds), preds

    @staticmethod
    def _promote(preds: Tensor, dtype: torch.dtype) -> Tensor:
        """Combine in at least the parameters' precision (autocast outputs are lower)."""
        return preds.to(torch.promote_types(preds.dtype, dtype))

    def _snapshot_buffers(self) -> list[tuple[Tensor, Tensor]]:
        """Copy the buffers a training-mode forward may update (batch-norm statistics)."""
        if not self.training:
            return []
        return [(b, b.clone()) for b in self.buffers()]

    def _check_finite(self, preds: Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(preds).all()):
            bad = torch.nonzero(~torch.isfinite(preds)).flatten().tolist()
            values = [preds[i].item() for i in bad[:10]]
            raise CombinationError(
                f"non-finite per-pose predictions at poses {bad} (values {values}); check "
                "the model and its inputs, or pass check_finite=False to MultiPoseModel"
            )
