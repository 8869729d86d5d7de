r"""Gradient strategies: how per-pose gradients are obtained for the shared Function.

Each strategy runs the single-pose model over the poses of one compound, never holding
more than one pose's autograd graph, and returns the detached per-pose predictions and
a :class:`~combframe.PoseGradients` that answers the backward's contraction.

=========  ===========================================  ===============================
strategy   held between forward and backward            losses supported
=========  ===========================================  ===============================
store      ``(N, P)`` per-pose gradients                any (combined and per-pose)
recompute  the poses and their RNG states; one ``P``    any
           accumulator during backward
stream     ``k`` running ``P``-sums (online softmax)    combined prediction only
=========  ===========================================  ===============================
"""

from __future__ import annotations

import contextlib
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, final

import torch
from torch import Tensor

from combframe._combination import BaseCombination, StreamingCombination
from combframe._errors import CombinationError, StrategyError
from combframe._gradients import ParamLayout, PoseGradients, StoredGradients

__all__ = [
    "PoseRunner",
    "Recompute",
    "Store",
    "Strategy",
    "Stream",
    "resolve_strategy",
]


@final
class PoseRunner:
    """Runs the single-pose model on one pose and checks what comes back.

    Parameters
    ----------
    model
        The single-pose model; ``model(pose)`` returns one element.
    pred_readout
        Optional callable applied to each pose's prediction.
    params
        The trainable parameters gradients are collected for.
    move_poses
        Move tensors in a pose to the model's device instead of raising.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pred_readout: Callable[[Tensor], Tensor] | None,
        params: Sequence[Tensor],
        move_poses: bool,
        device: torch.device,
    ) -> None:
        self.model = model
        self.pred_readout = pred_readout
        self.layout = ParamLayout(params)
        self.params = self.layout.params
        self.move_poses = move_poses
        self.device = device

    def predict(self, index: int, pose: Any) -> Tensor:
        """Return the 0-d prediction for ``pose`` (with a graph when grad mode is on)."""
        pose = self._place(index, pose)
        out = self.model(pose)
        if not isinstance(out, Tensor):
            raise CombinationError(
                f"the model returned {type(out).__name__} for pose {index}; it must return "
                "a tensor with one element (the pose's prediction)"
            )
        if self.pred_readout is not None:
            out = self.pred_readout(out)
        if out.numel() != 1:
            raise CombinationError(
                f"the model's prediction for pose {index} has shape {tuple(out.shape)}; "
                "it must have exactly one element. Reduce it in the model (e.g. .sum()) "
                "or pass pred_readout"
            )
        return out.reshape(())

    def grads(self, pred: Tensor, index: int, weight: Tensor | None = None) -> tuple[Tensor, ...]:
        """Gradients of ``pred`` (times ``weight``) w.r.t. the parameters; zeros for unused ones."""
        self.require_grad(pred, index)
        return torch.autograd.grad(
            pred, self.params, grad_outputs=weight, allow_unused=True, materialize_grads=True
        )

    def require_grad(self, pred: Tensor, index: int) -> None:
        """Raise if ``pred`` (pose ``index``) does not depend on a trainable parameter."""
        if not pred.requires_grad:
            raise CombinationError(
                f"the model's prediction for pose {index} does not require grad: it does "
                "not depend on any trainable parameter (was it detached, or computed under "
                "torch.no_grad() inside the model?)"
            )

    def check_devices(self, poses: Sequence[Any]) -> None:
        """Raise before any pose runs if a pose holds a tensor on another device.

        Nothing to check with ``move_poses``: such tensors are moved when the pose runs.
        """
        if self.move_poses:
            return
        for i, pose in enumerate(poses):
            _map_tensors(pose, functools.partial(self._check_device, i))

    def _place(self, index: int, pose: Any) -> Any:
        return _map_tensors(pose, lambda t: self._check_device(index, t))

    def _check_device(self, index: int, t: Tensor) -> Tensor:
        if t.device == self.device:
            return t
        if self.move_poses:
            return t.to(self.device, non_blocking=True)
        raise CombinationError(
            f"pose {index} holds a tensor on {t.device}, but the model is on {self.device}. "
            "Move the poses to the model's device, or pass move_poses=True to MultiPoseModel"
        )


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tensors, mappings, lists and tuples."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: _map_tensors(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class Strategy(ABC):
    """How per-pose gradients are collected and combined.

    Subclasses implement :meth:`collect`. ``supports_pose_losses`` says whether a loss on
    the per-pose predictions is supported.
    """

    name: ClassVar[str]
    supports_pose_losses: ClassVar[bool] = True

    @abstractmethod
    def collect(
        self, runner: PoseRunner, poses: Sequence[Any], combination: BaseCombination
    ) -> tuple[Tensor, PoseGradients]:
        """Run every pose; return the detached ``(N,)`` predictions and their gradient source."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@final
class Store(Strategy):
    """Store each pose's gradient in one preallocated ``(N, P)`` buffer (the default).

    Costs N forward and backward passes plus one ``N x P`` matrix-vector product, and
    ``N * P`` numbers of memory between forward and backward.
    """

    name = "store"

    def collect(
        self, runner: PoseRunner, poses: Sequence[Any], combination: BaseCombination
    ) -> tuple[Tensor, PoseGradients]:
        layout = runner.layout
        buffer = layout.new_buffer(len(poses))
        preds = []
        for i, pose in enumerate(poses):
            with torch.enable_grad():
                pred = runner.predict(i, pose)
                grads = runner.grads(pred, i)
            layout.flatten_into(grads, buffer[i])
            del grads  # free before the next pose's graph is built
            preds.append(pred.detach())
        return torch.stack(preds), StoredGradients(layout, buffer)


@dataclass(frozen=True)
class _RngState:
    cpu: Tensor
    device: Tensor | None


@dataclass(frozen=True)
class _AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device_type: str) -> _AutocastState:
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def restore(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def _device_rng_module(device: torch.device) -> Any:
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def _capture_rng(device: torch.device, previous: _RngState | None) -> _RngState:
    """Capture the RNG state; return ``previous`` itself if nothing drew from the RNG since.

    Sharing unchanged states keeps recompute's memory flat in N for models without
    randomness (a CPU generator state is about 5 kB per pose otherwise).
    """
    mod = _device_rng_module(device)
    state = _RngState(torch.get_rng_state(), None if mod is None else mod.get_rng_state(device))
    if previous is not None and _same_state(state, previous):
        return previous
    return state


def _same_state(a: _RngState, b: _RngState) -> bool:
    if not torch.equal(a.cpu, b.cpu):
        return False
    if a.device is None or b.device is None:
        return a.device is b.device
    return torch.equal(a.device, b.device)


@contextlib.contextmanager
def _replay_rng(state: _RngState, device: torch.device) -> Iterator[None]:
    """Run the body with the RNG as it was; leave the global RNG untouched afterwards."""
    devices = [] if state.device is None else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.set_rng_state(state.cpu)
        if state.device is not None:
            _device_rng_module(device).set_rng_state(state.device, device)
        yield


@final
class Recompute(Strategy):
    """Forward without graphs; backward re-runs pose ``i`` and back-propagates ``c_i``.

    Memory stays flat in N: one pose graph and one ``P``-sized accumulator. The RNG state
    of each pose is saved and restored, so dropout replays identically, and the autocast
    state of the forward is restored. Buffers (batch-norm running statistics) are restored
    after the re-runs, so they are updated once per pose, as in the forward. Poses whose
    coefficient :math:`c_i` is exactly zero (a sharp smooth-max far from the best pose)
    are not re-run: they contribute nothing.

    Parameters
    ----------
    check
        Debug option: compare each recomputed prediction with the forward's, bit for
        bit, and raise :class:`~combframe.StrategyError` if they differ (a
        non-deterministic model would give wrong gradients). Poses that are skipped
        because their coefficient is zero are not checked.
    """

    name = "recompute"

    def __init__(self, check: bool = False) -> None:
        self.check = check

    def collect(
        self, runner: PoseRunner, poses: Sequence[Any], combination: BaseCombination
    ) -> tuple[Tensor, PoseGradients]:
        rng: list[_RngState] = []
        preds = []
        autocast = _AutocastState.capture(runner.device.type)
        for i, pose in enumerate(poses):
            rng.append(_capture_rng(runner.device, rng[-1] if rng else None))
            # Pose 0 runs with a graph (freed at once) so that a prediction that does not
            # depend on the parameters is refused now, not in backward.
            with torch.set_grad_enabled(i == 0):
                pred = runner.predict(i, pose)
            if i == 0:
                runner.require_grad(pred, i)
            preds.append(pred.detach())
            del pred  # pose 0's graph must not outlive it: memory stays flat in N
        stacked = torch.stack(preds)
        return stacked, _RecomputedGradients(
            runner, list(poses), rng, autocast, stacked, self.check
        )

    def __repr__(self) -> str:
        return f"Recompute(check={self.check})"


@final
class _RecomputedGradients(PoseGradients):
    strategy = "recompute"

    def __init__(
        self,
        runner: PoseRunner,
        poses: list[Any],
        rng: list[_RngState],
        autocast: _AutocastState,
        preds: Tensor,
        check: bool,
    ) -> None:
        super().__init__(runner.layout)
        self.runner = runner
        self.poses = poses
        self.rng = rng
        self.autocast = autocast
        self.preds = preds
        self.check = check

    def contract(self, coeffs: Tensor) -> Tensor:
        runner = self.runner
        layout = self.layout
        flat = torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device)
        acc = layout.views(flat)
        buffers = _module_buffers(runner)
        saved = [b.clone() for b in buffers]
        # One host sync per compound: poses with c_i == 0 contribute nothing.
        active = torch.nonzero(coeffs).flatten().tolist()
        try:
            for i in active:
                pose = self.poses[i]
                with _replay_rng(self.rng[i], runner.device), torch.enable_grad():
                    with self.autocast.restore():
                        pred = runner.predict(i, pose)
                    if self.check and not torch.equal(pred.detach(), self.preds[i]):
                        raise StrategyError(
                            f"recomputed prediction for pose {i} is {pred.item()!r} but the "
                            f"forward gave {self.preds[i].item()!r}: the model is not "
                            "deterministic under a restored RNG state; use strategy='store'"
                        )
                    grads = runner.grads(pred, i, coeffs[i].to(pred.dtype))
                torch._foreach_add_(acc, grads)
                del grads, pred  # free before the next pose's graph is built
        finally:
            if buffers:
                torch._foreach_copy_(buffers, saved)
        return flat


def _module_buffers(runner: PoseRunner) -> list[Tensor]:
    modules: list[Any] = [runner.model]
    if isinstance(runner.pred_readout, torch.nn.Module):
        modules.append(runner.pred_readout)
    return [b for m in modules for b in m.buffers()]


@final
class Stream(Strategy):
    r"""Single pass with flat memory: running sums of weighted per-pose gradients.

    The combination must implement :class:`~combframe.StreamingCombination`. Exact for
    losses on the combined prediction; a loss on the per-pose predictions raises in
    backward.

    While pose :math:`i` is processed, its gradient :math:`g_i` is folded into ``k``
    running sums with the online softmax of FlashAttention: with log weight
    :math:`a_i`, features :math:`\phi_i` and running maximum :math:`m`,

    .. math::

        m' = \max(m, a_i), \quad
        Z \leftarrow e^{m - m'} Z + e^{a_i - m'}, \quad
        A_j \leftarrow e^{m - m'} A_j + e^{a_i - m'} \phi_{ij}\, g_i .

    Every exponent is at most zero, so nothing overflows however widely the
    predictions are spread (``pred_scale=1000`` puts log weights near :math:`10^4`).
    The scalar bookkeeping (:math:`a_i`, :math:`\phi_i`, :math:`m`, :math:`Z`) is done
    in float64 whatever the model's dtype; only the ``k`` sums of ``P`` numbers use the
    parameters' dtype.
    """

    name = "stream"
    supports_pose_losses = False

    def collect(
        self, runner: PoseRunner, poses: Sequence[Any], combination: BaseCombination
    ) -> tuple[Tensor, PoseGradients]:
        if not isinstance(combination, StreamingCombination):
            raise StrategyError(
                f"combination {combination.name!r} does not support strategy='stream' (it "
                "does not implement stream_terms/stream_coefficients); use strategy='store' "
                "or strategy='recompute'"
            )
        layout = runner.layout
        exact = _scalar_dtype(layout.device)
        scratch = layout.new_buffer(1)[0]
        preds: list[Tensor] = []
        acc: Tensor | None = None
        running_max = torch.tensor(float("-inf"), dtype=exact, device=layout.device)
        total = torch.zeros((), dtype=exact, device=layout.device)
        center = running_max
        # On the CPU reading a scalar costs nothing, so the bookkeeping runs on Python
        # floats and skips the rescale while the maximum holds and terms of weight 0.
        # Elsewhere it stays on the device, so that no pose waits for a host sync.
        on_host = _host_scalars(layout.device)
        host_max, host_total = -math.inf, 0.0
        for i, pose in enumerate(poses):
            with torch.enable_grad():
                pred = runner.predict(i, pose)
                y = pred.detach()
                yd = y.to(exact)
                if i == 0:
                    center = yd
                log_w, feats = combination.stream_terms(yd, center)
                if acc is None:  # before the first backward, so the peak is the same for all N
                    acc = torch.zeros(
                        (feats.shape[-1], layout.numel), dtype=layout.dtype, device=layout.device
                    )
                grads = runner.grads(pred, i)
            preds.append(y)
            layout.flatten_into(grads, scratch)
            del grads, pred  # free before the next pose's graph is built
            if on_host:
                new_host_max = max(host_max, float(log_w))
                scale_f = math.exp(host_max - new_host_max)
                weight_f = math.exp(float(log_w) - new_host_max)
                host_total = host_total * scale_f + weight_f
                host_max = new_host_max
                if scale_f != 1.0:
                    acc.mul_(scale_f)
                for j, phi in enumerate(feats.reshape(-1).tolist()):
                    if weight_f * phi != 0.0:
                        acc[j].add_(scratch, alpha=weight_f * phi)
                continue
            new_max = torch.maximum(running_max, log_w)
            scale = torch.exp(running_max - new_max)
            weight = torch.exp(log_w - new_max)
            total = total * scale + weight
            acc.mul_(scale.to(layout.dtype)).addr_((weight * feats).to(layout.dtype), scratch)
            running_max = new_max
        if on_host:
            total = torch.tensor(host_total, dtype=exact, device=layout.device)
        assert acc is not None
        return torch.stack(preds), _StreamedGradients(layout, acc, total, center)

    def __repr__(self) -> str:
        return "Stream()"


def _host_scalars(device: torch.device) -> bool:
    """Whether stream's per-pose bookkeeping may read scalars on the host (no sync cost)."""
    return device.type == "cpu"


def _scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for per-pose scalars, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@final
class _StreamedGradients(PoseGradients):
    supports_pose_losses = False
    strategy = "stream"

    def __init__(self, layout: ParamLayout, acc: Tensor, total: Tensor, center: Tensor) -> None:
        super().__init__(layout)
        self.acc = acc
        self.total = total
        self.center = center

    def contract(self, coeffs: Tensor) -> Tensor:  # pragma: no cover - guarded by the Function
        raise StrategyError(
            "the 'stream' strategy keeps only running sums, so it cannot weight poses "
            "individually; use strategy='store' or strategy='recompute'"
        )

    def contract_combined(
        self, comb_grad: Tensor, combination: BaseCombination, preds: Tensor, combined: Tensor
    ) -> Tensor:
        assert isinstance(combination, StreamingCombination)
        exact = self.total.dtype
        lam = combination.stream_coefficients(combined.to(exact), self.center)
        coeffs = lam.to(exact) * (comb_grad.to(exact) / self.total)
        return torch.mv(self.acc.t(), coeffs.to(self.acc.dtype))


_STRATEGIES: dict[str, type[Strategy]] = {"store": Store, "recompute": Recompute, "stream": Stream}


def resolve_strategy(strategy: str | Strategy) -> Strategy:
    """Return a strategy instance for a name (``"store"``, ``"recompute"``, ``"stream"``)."""
    if isinstance(strategy, Strategy):
        return strategy
    key = str(strategy).strip().lower()
    if key not in _STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; choose one of {sorted(_STRATEGIES)} "
            "or pass a combframe.Strategy instance"
        )
    return _STRATEGIES[key]()
