"""``MultiPoseModel``: a single-pose model, a combination and a gradient strategy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import torch
from torch import Tensor
from typing_extensions import override

from combframe.core.batch import CompoundPredictions, Segments
from combframe.core.combination import Combination, as_combination
from combframe.core.function import AfterPoses, PosePredictions, StreamedPredictions
from combframe.core.placement import place_combination
from combframe.core.strategies import PoseRunner, Strategy, resolve_strategy
from combframe.core.strategies.replay import BufferSnapshot, undo_side_effects
from combframe.core.weights import CallPrior, PerPose, combined_values, log_prior, result_weights
from combframe.errors import CombinationError

__all__ = ["MultiPoseModel"]


class MultiPoseModel(torch.nn.Module):
    """Combine a single-pose model's predictions over the poses of a compound.

    Only one pose's (or one chunk's) autograd graph is alive at a time; gradients of the
    combined and the per-pose predictions reach the model's parameters, the tensors in
    the poses that require grad and any parameter the pose graph reaches, exactly.

    Parameters
    ----------
    model
        Single-pose model: ``model(pose)`` returns a tensor with one element; with
        ``chunk_size > 1``, ``model(collate(poses))`` returns one element per pose. Or
        ``d`` values per pose (``(d,)``, ``(b, d)``): vector outputs, the same ``d``
        for every pose.
    combination
        A combination module (its parameters of the model's dtype), a registered name
        (``"max"``), a :class:`~combframe.CombinationConfig` or a ``{"name": ..., **params}``
        dict (built in the model's dtype and on its device).
    strategy
        ``"auto"`` (the default: store with one pose per pass when its ``(N, P)``
        buffer fits a quarter of the device's memory, otherwise recompute; chosen at the
        first forward, see :class:`~combframe.Auto`), ``"store"``, ``"recompute"``,
        ``"stream"``, or a strategy instance such as ``Recompute(check=True)`` or
        ``Auto(losses="combined")``.
    pred_readout
        Applied to each pose's prediction before combining (part of the per-pose graph).
    comb_readout
        Applied to the combined prediction (0-d for one compound, ``(C,)`` for a batch;
        ``(d,)`` and ``(C, d)`` for vector outputs: the head of a pooling combination).
        When it is a module, its trainable parameters' gradients are accumulated only
        after the poses' backward, so an error there leaves their ``.grad`` untouched.
    check_finite
        Raise if a per-pose prediction is NaN or infinite, naming the poses (one device
        sync per compound). Set ``False`` to skip the check.
    move_poses
        Move tensors in the poses to the model's device instead of raising on a mismatch.
    chunk_size
        Poses per model call. ``1`` (the default) calls the model on each pose (on a
        collated batch of one when ``collate`` is given); larger values run the poses of
        one or several compounds as collated batches (see
        ``docs/batched.md``: what each strategy does per chunk, and models such as
        batch norm in training mode whose output depends on the chunk).
    collate
        Builds a batch from a list of poses; used when ``chunk_size > 1`` or when given;
        default
        :func:`~combframe.default_collate` (stacks equal-shaped tensors leaf by leaf,
        PyTorch Geometric data into a ``Batch``). Poses of different sizes need their own.

    Notes
    -----
    Every pose is checked before the model runs on any of them: its tensors must be on
    the model's device (unless ``move_poses``). All trainable parameters must share one
    device (their per-pose gradients share one buffer, in the widest of their dtypes). A
    parameter no pose's graph reaches keeps ``.grad`` at ``None``, as with autograd. The
    per-pose predictions are
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
    >>> batched = combframe.MultiPoseModel(net, "mean", strategy="recompute", chunk_size=4)
    >>> compounds = [[torch.ones(1, 3)] * 2, [torch.zeros(1, 3)] * 3]
    >>> combined, per_pose, index = batched(compounds=compounds)
    >>> combined.shape, index.tolist()
    (torch.Size([2]), [0, 0, 1, 1, 1])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        combination: Any,
        *,
        strategy: str | Strategy = "auto",
        pred_readout: Callable[[Tensor], Tensor] | None = None,
        comb_readout: Callable[[Tensor], Tensor] | None = None,
        check_finite: bool = True,
        move_poses: bool = False,
        chunk_size: int = 1,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"chunk_size must be an integer >= 1 (poses per pass); got {chunk_size!r}"
            )
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be callable (a list of poses -> batch); got {collate!r}")
        self.chunk_size = chunk_size
        self.collate = collate

        self.model = model
        self.combination: Combination = as_combination(combination)
        place_combination(self.combination, model, given=self.combination is combination)
        self.strategy = resolve_strategy(strategy)
        self.strategy.check_combination(self.combination)
        self.pred_readout = pred_readout
        self.comb_readout = comb_readout
        self.check_finite = check_finite
        self.move_poses = move_poses
        self.register_load_state_dict_pre_hook(_combination_first)  # type: ignore[no-untyped-call]  # untyped in torch

    @override
    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, chunk_size={self.chunk_size}"

    def _trainable(self) -> list[Tensor]:
        """Return the trainable parameters of the model and the readout, each once, in order."""
        found = list(self.model.parameters())
        if isinstance(self.pred_readout, torch.nn.Module):
            found += list(self.pred_readout.parameters())
        return [p for p in dict.fromkeys(found) if p.requires_grad]

    def _device(self, params: Sequence[Tensor]) -> torch.device:
        for t in params:
            return t.device
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    @overload
    def forward(
        self, poses: Sequence[Any], *, prior: PerPose = None, mask: PerPose = None
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self, *, compounds: Sequence[Sequence[Any]], prior: PerPose = None, mask: PerPose = None
    ) -> CompoundPredictions: ...

    def forward(
        self,
        poses: Sequence[Any] | None = None,
        *,
        compounds: Sequence[Sequence[Any]] | None = None,
        prior: PerPose = None,
        mask: PerPose = None,
    ) -> tuple[Tensor, Tensor] | CompoundPredictions:
        """Predict one compound from its poses, or a batch of compounds.

        Parameters
        ----------
        poses
            One compound's poses; each is passed to the single-pose model as it is (a
            tensor, dict, tuple or any object the model accepts), or collated into
            chunks of ``chunk_size``.
        compounds
            Instead of ``poses`` (keyword only): a batch of compounds, each a list of
            poses. The poses of all compounds run in shared chunks and one backward
            serves the whole batch. :meth:`forward_compounds` is the same call.
        prior, mask
            Per-pose log prior weights and which poses count (:mod:`combframe.core.weights`).

        Returns
        -------
        tuple or CompoundPredictions
            For ``poses``: the combined prediction (0-d) and the ``(N,)`` per-pose ones.
            For ``compounds``: a :class:`~combframe.CompoundPredictions` (``(C,)``
            combined, ``(M,)`` per-pose, their ``(M,)`` index; ``d`` values per pose add
            a dimension ``d``). All are differentiable with respect to the model's
            parameters and to any tensor in the poses that requires grad.

        Raises
        ------
        CombinationError
            If there are no poses, a prediction has neither one element nor ``d`` per
            pose, does not depend on anything trainable, is not finite (with
            ``check_finite``), a pose is on another device than the model (checked for
            every pose before the model runs) or of a dtype it fails on (never cast).
            After any error, ``.grad`` fields and buffers are as they were before the call.
        """
        if (poses is None) == (compounds is None):
            raise TypeError(
                "MultiPoseModel takes the poses of one compound, model(poses), or a batch "
                "of compounds, model(compounds=[poses_1, poses_2, ...]); got "
                + ("neither" if poses is None else "both")
            )
        if compounds is None:
            assert poses is not None
            result = self._run([_as_pose_list(poses)], (prior, mask), single=True)
            return result.combined, result.per_pose
        batch = [_as_pose_list(c) for c in compounds]
        if not batch:
            raise CombinationError("compounds is empty: a batch needs at least one compound")
        empty = [c for c, p in enumerate(batch) if len(p) == 0]
        if empty:
            raise CombinationError(
                f"compounds {empty[:10]} have no poses: each compound needs at least one pose"
            )
        return self._run(batch, (prior, mask))

    def pose_weights(
        self, per_pose: Tensor | CompoundPredictions, index: Tensor | None = None, **kw: Any
    ) -> Tensor:
        """Return each pose's weight in its compound's value (:func:`combframe.pose_weights`).

        ``model.pose_weights(out)``, or the latest call's ``per_pose``, weighs the poses
        with that call's prior and mask; ``prior=`` or ``mask=`` given here replace them.
        """
        latest = self.__dict__.get("_call_prior", CallPrior())
        return result_weights(self.combination, per_pose, index, latest, kw)

    def forward_compounds(
        self, compounds: Sequence[Sequence[Any]], prior: PerPose = None, mask: PerPose = None
    ) -> CompoundPredictions:
        """Predict a batch of compounds; the same as ``model(compounds=compounds, ...)``."""
        out: CompoundPredictions = self(compounds=compounds, prior=prior, mask=mask)
        return out

    def _run(
        self, compounds: list[list[Any]], side: tuple[PerPose, PerPose], single: bool = False
    ) -> CompoundPredictions:
        """Run a batch of compounds (``side``: prior and mask); ``single``: a 0-d value."""
        if len(compounds[0]) == 0 and len(compounds) == 1:
            raise CombinationError(
                "poses is empty: a compound needs at least one pose to be predicted"
            )
        poses = [p for c in compounds for p in c]
        params = self._trainable()
        device = self._device(params)
        runner = PoseRunner(
            self.model,
            self.pred_readout,
            params,
            self.move_poses,
            device,
            chunk_size=self.chunk_size,
            collate=self.collate,
        )
        runner.scan(poses)
        segments = Segments.from_sizes([len(c) for c in compounds], device)
        segments = log_prior(self.combination, *side, segments)
        # The buffers a training-mode forward may update (batch-norm statistics), put
        # back if it fails; any module in training mode counts (the wrapper may be in
        # eval while the model, or a readout module, trains).
        snapshot = BufferSnapshot.of([self])
        try:
            held = _hold(self.comb_readout)
            combined, per_pose = self._combine(runner, poses, segments, held)
            if single:
                combined = combined[0]
            if held:
                assert isinstance(self.comb_readout, torch.nn.Module)
                combined = torch.func.functional_call(self.comb_readout, held, (combined,))
            elif self.comb_readout is not None:
                combined = self.comb_readout(combined)
        except BaseException:
            snapshot.restore()
            raise
        if segments.prior is not None:  # for pose_weights(per_pose) of this call
            self.__dict__["_call_prior"] = CallPrior(per_pose, segments.prior)
        return CompoundPredictions(combined, per_pose, segments.index, segments.prior)

    def _combine(
        self,
        runner: PoseRunner,
        poses: Sequence[Any],
        segments: Segments,
        held: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        if self._needs_graph(runner, poses):
            preds, source = self.strategy.collect(runner, poses, segments, self.combination)
            preds = self._promote(preds, source.layout.dtype)
            inputs = (*source.targets.inputs, *held.values())
            if source.supports_pose_losses:
                own = _hold(self.combination)
                per_pose: Tensor = PosePredictions.apply(  # type: ignore[no-untyped-call]  # untyped in torch
                    source, preds, *inputs, *own.values()
                )
                combined = combined_values(self.combination, per_pose, segments, own)
                self._check_finite(preds, combined)
                return combined, per_pose
            # With the predictions detached, the graph of ``combined`` reaches only the
            # combination's own parameters, which StreamedPredictions' backward serves.
            combined = combined_values(self.combination, preds, segments)
            self._check_finite(preds, combined)
            out: tuple[Tensor, Tensor] = StreamedPredictions.apply(  # type: ignore[no-untyped-call]  # untyped
                source, combined, preds, *inputs
            )
            return out
        with torch.no_grad():
            chunks = runner.chunks(len(poses))
            preds = torch.cat([runner.predict(poses[s:e], s) for s, e in chunks])
            if runner.params:
                preds = self._promote(preds, runner.targets.layout.dtype)
        # in grad mode, the combination's own parameters still get their gradient
        combined = combined_values(self.combination, preds, segments)
        self._check_finite(preds, combined)
        return combined, preds

    @staticmethod
    def _needs_graph(runner: PoseRunner, poses: Sequence[Any]) -> bool:
        """Whether gradients are wanted: grad mode, and something in the graph needs them.

        Without trainable parameters or pose tensors that require grad, the first chunk
        is run with a graph to see whether it reaches a parameter through a closure.
        """
        if not torch.is_grad_enabled():
            return False
        if runner.params or runner.pose_inputs:
            return True
        # The probe runs the first chunk once more: its draws from the RNG and its
        # buffer updates are undone, so the real run is the only one that counts.
        with undo_side_effects(runner.modules, runner.device), torch.enable_grad():
            probe = runner.predict(poses[: runner.chunk_size], 0)
        return probe.requires_grad

    @staticmethod
    def _promote(preds: Tensor, dtype: torch.dtype) -> Tensor:
        """Combine in at least the parameters' precision (autocast outputs are lower)."""
        return preds.to(torch.promote_types(preds.dtype, dtype))

    def _check_finite(self, preds: Tensor, combined: Tensor) -> None:
        """Raise if a per-pose or combined prediction is NaN or infinite (one host sync)."""
        if not self.check_finite:
            return
        if bool(torch.isfinite(preds).all() & torch.isfinite(combined).all()):
            return
        rows = preds.reshape(preds.shape[0], -1)  # one row per pose, d values
        bad = torch.nonzero(~torch.isfinite(rows).all(1)).flatten().tolist()
        if bad:
            values = [preds[i].tolist() for i in bad[:10]]
            raise CombinationError(
                f"non-finite per-pose predictions at poses {bad} (values {values}); check "
                "the model and its inputs, or pass check_finite=False to MultiPoseModel"
            )
        each = combined.reshape(combined.shape[0], -1)
        worse = torch.nonzero(~torch.isfinite(each).all(1)).flatten().tolist()
        values = [combined[c].tolist() for c in worse[:10]]
        raise CombinationError(
            f"the combination {self.combination!r} gives non-finite values {values} for "
            f"compounds {worse} from finite per-pose predictions (range "
            f"{preds.min().item():.6g} to {preds.max().item():.6g}): its parameters overflow "
            "on these values (a pred_scale or 1/kT so large that scale x prediction exceeds "
            "the dtype's range); choose a smaller one, or pass check_finite=False"
        )


def _as_pose_list(poses: Any) -> list[Any]:
    """Return one compound's poses as a list (a tensor is split along its first dimension).

    A single dict is one pose, not a collection of them.
    """
    return [poses] if isinstance(poses, dict) else list(poses)


def _hold(module: object) -> dict[str, Tensor]:
    """Hold a module's trainable parameters until the poses' backward.

    Used in place of the parameters by the ``comb_readout`` (or the combination) and
    passed to the pose Function as extra inputs
    (:class:`~combframe.core.function.AfterPoses`), so that an error in the poses'
    backward comes before their ``.grad`` is written. Empty when no gradient is
    recorded or ``module`` is not a module with trainable parameters.
    """
    if not torch.is_grad_enabled() or not isinstance(module, torch.nn.Module):
        return {}
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not named:
        return {}
    views = AfterPoses.apply(*named.values())  # type: ignore[no-untyped-call]  # untyped in torch
    return dict(zip(named, views, strict=True))


def _combination_first(
    module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """Check the saved combination before any weight is loaded.

    ``load_state_dict`` loads the model's weights before reaching the combination, so
    a mismatch found there would leave them replaced; checked first, it leaves the
    whole model as it was.
    """
    key = f"{prefix}combination._extra_state"
    if key in state_dict:
        assert isinstance(module, MultiPoseModel)
        module.combination.set_extra_state(state_dict[key])
