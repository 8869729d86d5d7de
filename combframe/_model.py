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
        names, params = [], []
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
            or a pose is on another device than the model.
        """
        if isinstance(poses, Tensor | dict) or not isinstance(poses, Sequence):
            poses = list(poses) if not isinstance(poses, dict) else [poses]
        if len(poses) == 0:
            raise CombinationError(
                "poses is empty: a compound needs at least one pose to be predicted"
            )
        names, params = self._trainable()
        runner = PoseRunner(
            self.model, self.pred_readout, params, self.move_poses, self._device(params)
        )
        if torch.is_grad_enabled() and params:
            preds, source = self.strategy.collect(runner, poses, self.combination)
            self._check_finite(preds)
            combined, per_pose = CombinationFunction.apply(
                self.combination, preds, source, names, *params
            )
        else:
            with torch.no_grad():
                preds = torch.stack([runner.predict(i, pose) for i, pose in enumerate(poses)])
                self._check_finite(preds)
                combined = self.combination.value(preds)
            per_pose = preds
        if self.comb_readout is not None:
            combined = self.comb_readout(combined)
        return combined, per_pose

    def _check_finite(self, preds: Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(preds).all()):
            bad = torch.nonzero(~torch.isfinite(preds)).flatten().tolist()
            values = [preds[i].item() for i in bad[:10]]
            raise CombinationError(
                f"non-finite per-pose predictions at poses {bad} (values {values}); check "
                "the model and its inputs, or pass check_finite=False to MultiPoseModel"
            )
