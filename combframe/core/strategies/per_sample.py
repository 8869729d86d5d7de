"""Store's per-sample path: the per-pose gradients of a whole chunk by ``torch.func``.

With ``chunk_size > 1`` store needs each pose's own gradient. A model that
:func:`torch.func.vmap` can map over the poses of a chunk gives them in one pass:
``vmap(grad(f), in_dims=(None, 0), randomness="error")``. Whether it can is decided once
per model and collate (:class:`PerSampleVerdicts`) and re-decided only when the model's
structure changes; the checks that need a forward (the first chunk's predictions
compared with one-pose ones, parameters reached other than by name, the first pose's
row compared with autograd's) run on the first step only.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence
from typing import Any, final

import torch
from torch import Tensor

from combframe.core.batch import default_collate
from combframe.core.strategies.graph import _graph_mark, _reached
from combframe.core.strategies.replay import (
    BufferSnapshot,
    RngState,
    buffer_copies,
    undo_side_effects,
    version,
)
from combframe.core.strategies.runner import PoseRunner, Poses
from combframe.errors import CombinationError

UPDATES_BUFFERS = (
    "the model updates buffers in place (batch-norm statistics, the power iteration of "
    "spectral norm), once per call, so a chunk is not the same as its poses one by one"
)

HIDDEN_PARAMETERS = (
    "the model uses a parameter other than through its registered name (a closure or a "
    "list holding it), which torch.func.vmap cannot see"
)
#: A verdict: ``None`` when the per-sample path serves, else why it does not.
Verdict = str | None
#: The verdict of a model for which the checks that need a run have not been made.
UNDECIDED = "not decided yet"


@final
class PerSampleVerdicts:
    """Whether the per-sample path serves a model, decided once per model and collate.

    A model is known once store has checked that it treats the poses of a batch
    independently; its verdict is :data:`UNDECIDED` until the per-sample path was tried
    (something of the call, such as pose tensors that require grad, may have kept it
    from being tried). A verdict is kept per model (weakly) with the structure it was
    decided for: the collate and readout, every module and its training mode and forward
    hooks (the global ones too), every parameter and whether it requires grad, every
    buffer, by identity. It is re-decided when any of them changes (a parameter frozen,
    ``model.eval()``, a submodule replaced, a forward hook registered), and a verdict that
    allows batched work also when a buffer was written in place since (a flag or a scale
    held in a buffer can make a model mix the poses of a batch).
    """

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[
            torch.nn.Module, tuple[tuple[Hashable, Hashable], Verdict, bool]
        ] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle no verdict: a copy of a model is decided again (its identity is new)."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # a fresh, empty table

    @staticmethod
    def structure(runner: PoseRunner) -> tuple[Hashable, Hashable]:
        """Return what a verdict depends on (one walk of the modules).

        The structure by identity, and the version counters of the buffers (bumped by
        every in-place write).
        """
        modules = [m for top in runner.modules for m in top.modules()]
        buffers = [b for m in modules for b in m._buffers.values() if b is not None]
        hooks = torch.nn.modules.module
        return (
            id(runner.collate),
            id(runner.pred_readout),
            tuple(
                (id(m), m.training, *m._forward_pre_hooks, -1, *m._forward_hooks) for m in modules
            ),
            (*hooks._global_forward_pre_hooks, -1, *hooks._global_forward_hooks),
            tuple((id(p), p.requires_grad) for m in modules for p in m.parameters(recurse=False)),
            tuple(id(b) for b in buffers),
        ), tuple(version(b) for b in buffers)

    def get(self, runner: PoseRunner, ragged: bool) -> tuple[bool, Verdict]:
        """``(known, verdict)`` for the runner's model as it is now.

        ``ragged``: whether this call's poses differ in shape. A verdict that allows
        batched work, decided on poses of one shape, does not cover them: a collate that
        pads to the longest pose makes a model mix the poses of a batch only then.
        """
        kept = self._known.get(runner.model)
        if kept is None:
            return False, UNDECIDED
        (structure, versions), verdict, seen_ragged = kept
        now, now_versions = self.structure(runner)
        # A verdict that keeps to one pose (or one chunk) per pass stays safe whatever
        # the buffers hold; one that allows batched work holds for the values it saw.
        if now != structure or (
            verdict is None and (now_versions != versions or (ragged and not seen_ragged))
        ):
            return False, UNDECIDED
        return True, verdict

    def set(self, runner: PoseRunner, verdict: Verdict, ragged: bool) -> None:
        """Keep ``verdict`` for the runner's model as it is now, decided on ``ragged`` poses."""
        self._known[runner.model] = (self.structure(runner), verdict, ragged)


def ragged(runner: PoseRunner, start: int, stop: int) -> bool:
    """Whether the poses ``start:stop`` of the scanned call differ in their tensors' shapes."""
    return len({tuple(t.shape for t in leaves) for leaves in runner.leaves[start:stop]}) > 1


def obstacle(runner: PoseRunner) -> str | None:
    """Why per-sample gradients cannot serve this call, from what is known without a run."""
    if runner.collate is not default_collate:
        return "a custom collate (poses of different sizes cannot be vmapped)"
    if runner.pose_inputs or runner.params_in_poses:
        return "pose tensors require grad"
    if len(runner.targets.layout.params) != len(_named_trainable(runner.model)):
        return "parameters outside the model (a readout module or a closure) require grad"
    named = list(runner.model.named_parameters(remove_duplicate=False))
    if len(named) != len(dict(runner.model.named_parameters())):
        return "the model shares a parameter between modules"
    return None


def preview(runner: PoseRunner, poses: Poses) -> Tensor | None:
    """Return the first chunk's predictions as recompute and stream get them, or None.

    Run without a graph and leaving no trace; store compares them with its one-pose
    predictions (:func:`check_independent`) to check that the model treats the poses of
    a batch independently, which per-pose gradients assume. A model that draws random
    numbers cannot be compared (a batch draws other numbers than its poses alone): None.
    """
    with undo_side_effects(runner.modules, runner.device), torch.no_grad():
        drawn = RngState.capture(runner.device)
        first = runner.predict(poses[: runner.chunk_size], 0)
        return first if RngState.capture(runner.device, drawn) is drawn else None


def check_independent(runner: PoseRunner, alone: Tensor, together: Tensor, count: int) -> None:
    """Raise if the first chunk's batched predictions differ from one-pose predictions.

    ``together`` holds the batched first chunk's predictions, of which the first
    ``count`` are compared with ``alone`` (one pose when the model writes buffers: the
    later poses alone start from the buffers pose 0 left).
    """
    whole = together.shape[0]
    count = min(count, whole)
    together, alone = together[:count], alone[:count]
    scale = together.abs().clamp_min(1.0)
    tol = max(1e3 * torch.finfo(together.dtype).eps, 1e-9)
    if bool(((alone.to(together.dtype) - together).abs() <= tol * scale).all()):
        return
    shown = f"the batch of poses 0..{whole - 1}"
    if count < whole:
        shown = ("pose 0" if count == 1 else f"poses 0..{count - 1}") + " in " + shown
    raise CombinationError(
        f"the model's predictions for {shown} "
        f"({together.tolist()[:4]}...) differ from its predictions one pose at a time "
        f"({alone.tolist()[:4]}...): it mixes the poses of a batch. strategy='store' needs "
        "each pose's own gradient and runs poses alone; use strategy='recompute' or "
        "'stream', which run whole chunks (and see docs/batched.md on such models)"
    )


def hidden_parameters(runner: PoseRunner, pose: Any) -> bool:
    """Whether the model reaches a parameter other than through its registered name.

    Runs one pose through ``torch.func.functional_call`` with fresh copies of the
    parameters and walks the graph: the original parameters must not appear in it (a
    closure or a list holding one would keep using it, out of torch.func's sight).
    """
    from torch.func import functional_call

    model = runner.model
    trainable, fixed = _functional_state(model)
    copies = {n: p.detach().requires_grad_(True) for n, p in trainable.items()}
    with undo_side_effects(runner.modules, runner.device), torch.enable_grad():
        mark = _graph_mark()
        out = functional_call(
            model, {**copies, **fixed}, (default_collate([runner.place(0, pose)]),)
        )
        if runner.pred_readout is not None:
            out = runner.pred_readout(out)
    if not isinstance(out, Tensor) or out.grad_fn is None:
        return False
    leaves, _, _ = _reached(out, {id(c) for c in copies.values()}, mark)
    originals = {id(p) for p in trainable.values()}
    return any(id(leaf) in originals for leaf in leaves)


def per_sample_chunks(
    runner: PoseRunner, poses: Sequence[Any], buffer: Tensor, preds: list[Tensor], compare: bool
) -> str | None:
    """Fill ``buffer`` rows from 1 on by per-sample gradients; append the predictions.

    With ``compare`` (the first step for a model) the first chunk also recomputes pose
    0, whose row autograd already wrote: if the two disagree (a parameter the model
    reaches other than through its registered name), the rest falls back to one pose
    per pass. Otherwise the chunks start at pose 1. Returns why it stopped, or None.
    """
    trainable, fixed = _functional_state(runner.model)
    # The attempt runs on copies of the buffers: a buffer it writes is found afterwards
    # and the model's own are left as they were.
    copies = buffer_copies(runner.model)
    snapshot = BufferSnapshot(list(copies.values()), by_value=True)
    fixed.update(copies)
    tol = 256 * torch.finfo(buffer.dtype).eps
    for s, e in runner.chunks(len(poses), start=0 if compare else 1):
        rows = buffer[s:e] if s else torch.empty_like(buffer[s:e])
        pred = _per_sample_grads(runner, (trainable, fixed), poses[s:e], s, rows)
        if s == 0:
            want = buffer[0]
            scale = float(want.abs().max()) if want.numel() else 0.0
            if not torch.allclose(rows[0], want, rtol=tol, atol=tol * scale):
                return (
                    "per-sample gradients by torch.func.vmap differ from autograd's for "
                    "this model (a parameter used other than through its registered name?)"
                )
            buffer[1:e] = rows[1:]
            pred = pred[1:]
        preds.append(pred)
    return UPDATES_BUFFERS if snapshot.changed() else None


def _named_trainable(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _functional_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Return the trainable parameters by name, and the rest ``functional_call`` needs."""
    fixed: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    return _named_trainable(model), fixed


def _per_sample_grads(
    runner: PoseRunner,
    state: tuple[dict[str, Tensor], dict[str, Tensor]],
    poses: Sequence[Any],
    start: int,
    out: Tensor,
) -> Tensor:
    """Write the chunk's per-pose gradients into ``out`` (one row, or d, per pose); return preds.

    ``state`` is the trainable parameters by name and the rest ``functional_call`` needs.
    """
    from torch.func import functional_call, grad, jacrev, vmap

    model = runner.model
    trainable, fixed = state
    readout = runner.pred_readout
    width = runner.width or 1
    shape = () if width == 1 else (width,)  # d values per pose: per-sample Jacobians

    def predict_one(params: dict[str, Tensor], pose: Any) -> tuple[Tensor, Tensor]:
        pred = functional_call(model, {**params, **fixed}, (default_collate([pose]),))
        if readout is not None:
            pred = readout(pred)
        if pred.numel() != width:
            raise CombinationError(
                f"the model returned shape {tuple(pred.shape)} for a chunk of one pose"
            )
        pred = pred.reshape(shape)
        return pred, pred.detach()

    batch = default_collate([runner.place(start + k, p) for k, p in enumerate(poses)])
    derivative = grad if width == 1 else jacrev
    per_pose = vmap(derivative(predict_one, has_aux=True), in_dims=(None, 0), randomness="error")
    grads, preds = per_pose(trainable, batch)
    rows = out.shape[:-1]  # (b,) or (b, d)
    torch.cat([grads[n].detach().reshape(*rows, -1) for n in trainable], dim=-1, out=out)
    result: Tensor = preds.detach().reshape(rows)
    return result
