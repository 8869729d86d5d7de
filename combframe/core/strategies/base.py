"""The strategy contract: capability flags declared once, and the first chunk's checks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from combframe.core.batch import Segments
from combframe.core.combination import Combination
from combframe.core.strategies.chunk import Chunk
from combframe.core.strategies.runner import Collected, PoseRunner, Poses
from combframe.errors import StrategyError


class Strategy(ABC):
    """How the gradients of the per-pose predictions are collected.

    Subclasses implement :meth:`collect` and declare what they support once, as class
    attributes: ``supports_pose_losses`` (a loss on the per-pose predictions) and
    ``activation_hooks`` (gradient hooks on activations see what the full graph gives
    them); :meth:`check_combination` says which combinations they run.
    """

    name: ClassVar[str]
    supports_pose_losses: ClassVar[bool] = True
    #: Whether gradient hooks on activations see what the full graph gives them.
    activation_hooks: ClassVar[bool] = False

    @abstractmethod
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        """Run every pose; return the detached ``(M,)`` predictions and their gradient source."""

    def check_combination(self, combination: Combination) -> None:
        """Raise :class:`~combframe.StrategyError` if this strategy cannot run ``combination``.

        Called when :class:`~combframe.MultiPoseModel` is built and again per forward;
        every combination can run, unless a strategy says otherwise.
        """
        return None

    def first_chunk(self, runner: PoseRunner, poses: Poses, start: int, stop: int) -> Chunk:
        """Run poses ``[start, stop)`` with a graph, check it and find the targets it reaches.

        Raises
        ------
        StrategyError
            If the model has a gradient hook on an activation this strategy cannot honour.
        """
        chunk = runner.run_chunk(poses, start, stop)
        runner.discover(chunk.pred, chunk.aliases)
        if runner.activation_hooks and not self.activation_hooks:
            raise StrategyError(
                "the model has a gradient hook on a tensor other than a parameter "
                "(Tensor.register_hook inside forward, or a module backward hook such as "
                f"register_full_backward_hook); strategy={self.name!r} computes "
                + (
                    "each pose's gradient before the loss is known"
                    if self.supports_pose_losses
                    else "running sums weighted by the combination alone"
                )
                + ", so such a hook would not see the c_i * dy_i/dh the full graph gives "
                "it. Use strategy='recompute', which back-propagates each chunk with its "
                "coefficients, or remove the hook (hooks on parameters, "
                "param.register_hook, work with every strategy)"
            )
        return chunk

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_flag(owner: str, value: object) -> bool:
    """Return ``value`` if it is a bool; raise naming ``owner`` and the value otherwise.

    ``Recompute(check="no")`` would otherwise read as off in its repr and stay on.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{owner}(check=...) takes True or False; got {value!r}")
    return value
