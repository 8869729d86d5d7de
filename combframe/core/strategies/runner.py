"""Running the single-pose model on chunks of poses, and what a strategy asks of a chunk.

:class:`PoseRunner` checks every pose once before any runs, runs a chunk (stand-ins
for the pose tensors that require grad, placement, collation, the model, the readout,
the output's checks, the graph walk) and returns a :class:`Chunk`, which a strategy asks
for the chunk's gradients, weighted or batched.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, final

import torch
from torch import Tensor

from combframe.core.batch import collated_alone, default_collate, dtype_clash
from combframe.core.gradients import GradTargets, ParamLayout, PoseGradients
from combframe.core.strategies.chunk import Aliases, Chunk
from combframe.core.strategies.graph import (
    _graph_mark,
    _held_hooks,
    _module_backward_hooks,
    _reached,
    _Watch,
)
from combframe.core.strategies.outputs import OutputShape, what
from combframe.core.tree import Rebuild, flatten
from combframe.errors import CombinationError

#: The poses of a batch of compounds, flat.
Poses = Sequence[Any]
#: What a strategy's forward gives: the detached ``(M,)`` predictions and their gradients.
Collected = tuple[Tensor, PoseGradients]


@final
class PoseRunner:
    """Runs the single-pose model on chunks of poses and checks what comes back.

    Parameters
    ----------
    model
        The single-pose model. With ``chunk_size=1`` and no ``collate`` it is called on
        each pose and returns one element; otherwise on ``collate(chunk)`` and returns one
        element per pose of the chunk.
    pred_readout
        Optional callable applied to the model's output (per pose, or per chunk).
    params
        The trainable parameters of the model and the readout.
    move_poses
        Move tensors in a pose to the model's device instead of raising.
    device
        The model's device.
    chunk_size
        Poses per pass.
    collate
        Builds one batch from a list of poses (chunked runs only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pred_readout: Callable[[Tensor], Tensor] | None,
        params: Sequence[Tensor],
        move_poses: bool,
        device: torch.device,
        chunk_size: int = 1,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.model = model
        self.pred_readout = pred_readout
        self.params = tuple(params)
        self.move_poses = move_poses
        self.device = device
        self.chunk_size = chunk_size
        #: The model and, when it is a module, the readout.
        self.modules: list[torch.nn.Module] = [
            model,
            *([pred_readout] if isinstance(pred_readout, torch.nn.Module) else []),
        ]
        self.batched = chunk_size > 1 or collate is not None
        self.collate = collate or default_collate
        self.pose_inputs: tuple[Tensor, ...] = ()
        #: Each pose's tensors, flattened once by :meth:`scan`, and how to rebuild the
        #: pose around others (stand-ins, tensors moved to the device).
        self.leaves: list[list[Tensor]] = []
        self.rebuilds: list[Rebuild] = []
        #: The parameters' layout, made once (the targets before any graph was walked).
        self.param_layout = ParamLayout(self.params, device)
        self.targets = GradTargets(self.param_layout)
        self.discovered = False
        #: Ids of the targets some pose graph run so far has reached (see ``discover``).
        self.used: set[int] = set()
        self._mark = 0
        self.readers: list[list[int]] = []
        self.inert: tuple[Tensor, ...] = ()
        #: Whether some pose holds a trainable parameter (its gradient then also flows
        #: through the pose, out of ``torch.func``'s sight).
        self.params_in_poses = False
        #: Whether a run with a graph met a gradient hook on a tensor other than a
        #: parameter (``Tensor.register_hook`` inside forward, a module backward hook).
        self.activation_hooks = False
        #: Whether the model makes leaves of its own inside forward (forces): every later
        #: run with a graph is then watched too, to tell them from captured tensors.
        self.makes_leaves = False
        self._private: set[int] = set()
        #: The shape of the outputs: ``d`` values per pose, known once a chunk ran.
        self.outputs = OutputShape()

    @property
    def width(self) -> int | None:
        """Values per pose (``d``; 1 for one value), ``None`` until a chunk ran."""
        return self.outputs.width

    # ---- before any pose runs --------------------------------------------------------
    def scan(self, poses: Sequence[Any]) -> None:
        """Check every pose's devices; find the pose tensors that require grad.

        Raises before any pose runs if a pose holds a tensor on another device (unless
        ``move_poses``).
        """
        found: dict[int, Tensor] = {}
        readers: dict[int, list[int]] = {}
        inert: list[Tensor] = []
        params = {id(p) for p in self.params}
        grad = torch.is_grad_enabled()
        flat = [flatten(pose) for pose in poses]
        self.leaves = [leaves for leaves, _ in flat]
        self.rebuilds = [rebuild for _, rebuild in flat]
        check, device = not self.move_poses, self.device
        for i, leaves in enumerate(self.leaves):
            for t in leaves:
                if check and t.device != device:
                    self._check_device(i, t)  # raises
                if grad and id(t) in params:
                    self.params_in_poses = True
                elif grad and t.requires_grad:
                    found.setdefault(id(t), t)
                    mine = readers.setdefault(id(t), [])
                    if not mine or mine[-1] != i:
                        mine.append(i)
                elif grad and t.is_leaf:
                    inert.append(t)
        self.pose_inputs = tuple(found.values())
        #: For each pose tensor that requires grad, the poses that hold it.
        self.readers = [readers[id(t)] for t in self.pose_inputs]
        #: The leaf pose tensors that did not require grad (see ``_watched``).
        self.inert = tuple(inert)
        self.targets = GradTargets(self.param_layout, self.pose_inputs)

    def chunks(self, m: int, start: int = 0) -> list[tuple[int, int]]:
        """``(start, stop)`` of each chunk of a flat list of ``m`` poses."""
        step = self.chunk_size
        return [(s, min(s + step, m)) for s in range(start, m, step)]

    # ---- running ---------------------------------------------------------------------
    def run_chunk(self, poses: Poses, start: int, stop: int, graph: bool = True) -> Chunk:
        """Run poses ``[start, stop)``; with ``graph``, check the predictions require grad."""
        if not graph:
            with torch.no_grad():
                return Chunk(self, start, self.predict(poses[start:stop], start), {})
        with torch.enable_grad():
            aliases = self.aliases(start, stop)
            pred = self.predict(poses[start:stop], start, aliases)
        self.require_grad(pred, start)
        return Chunk(self, start, pred, aliases)

    def aliases(self, start: int, stop: int) -> Aliases:
        """Return fresh leaves standing in for the pose tensors that require grad.

        Those of poses ``[start, stop)``, as :meth:`scan` found them. The model runs on
        these, so that gradients stop at the pose tensors (and reach whatever produced
        them through the Function's inputs, exactly once).
        """
        if not self.pose_inputs:
            return {}
        slots = self.targets.slots
        out: Aliases = {}
        for leaves in self.leaves[start:stop]:
            for t in leaves:
                if id(t) in slots and id(t) not in out:
                    out[id(t)] = t.detach().requires_grad_(True)
        return out

    def predict(self, poses: Sequence[Any], start: int, aliases: Aliases | None = None) -> Tensor:
        """Return the ``(b,)`` or ``(b, d)`` predictions of ``b`` poses (a graph in grad mode)."""
        if torch.is_grad_enabled():
            self._mark = _graph_mark()
        if aliases or self.move_poses:
            placed = [self.place(start + k, pose, aliases) for k, pose in enumerate(poses)]
        else:  # nothing to substitute or move: the poses as they are
            placed = list(poses)
        alone = not self.batched and not collated_alone(placed[0])
        batch = placed[0] if alone else self.collate(placed)
        if torch.is_grad_enabled() and (not self.discovered or self.makes_leaves):
            watch = _Watch()
            with watch:
                out = self._call(batch, start, len(poses))
            self._watched(watch, poses, start)
        else:
            out = self._call(batch, start, len(poses))
        if not isinstance(out, Tensor):
            raise CombinationError(
                f"the model returned {type(out).__name__} for {self.what(start, len(poses))}; "
                "it must return a tensor with one element per pose (the prediction)"
            )
        if self.pred_readout is not None:
            out = self.pred_readout(out)
        out = self.outputs.check(out, start, len(poses), self.batched, self.chunk_size)
        if self.discovered and torch.is_grad_enabled():
            self.verify(out, aliases or {}, start)
        return out

    def _call(self, batch: Any, start: int, b: int) -> Any:
        """Run the model on ``batch``; a dtype clash of poses and parameters says so."""
        try:
            return self.model(batch)
        except RuntimeError as exc:
            clash = dtype_clash(batch, self.params, self.what(start, b), exc)
            if clash is None:
                raise
            raise clash from exc

    def require_grad(self, pred: Tensor, start: int, when: str = "") -> None:
        """Raise if ``pred`` does not depend on anything that requires grad."""
        if not pred.requires_grad:
            which = self.what(start, pred.numel()).replace("the chunk", "any pose of the chunk")
            raise CombinationError(
                f"the model's prediction for {which} does not require grad{when}: it does "
                "not depend on any trainable parameter (was it detached, or computed under "
                "torch.no_grad() inside the model?)"
            )

    def discover(self, pred: Tensor, aliases: Aliases) -> None:
        """Walk a chunk's graph; add the leaves it reaches to the targets.

        Raises
        ------
        CombinationError
            If the graph reaches a tensor that requires grad and was computed before the
            model ran (captured from outside): its gradient could not reach what
            produced it.
        """
        known = {id(p) for p in self.params} | {id(a) for a in aliases.values()}
        leaves, foreign, hit = _reached(pred, known, self._mark)
        leaves = [t for t in leaves if id(t) not in self._private]
        self._mark_used(hit, aliases, leaves)
        if foreign:
            raise CombinationError(
                "the model's prediction depends on a tensor that requires grad and was "
                "computed outside the model (its graph reaches "
                + "; ".join(sorted(set(foreign))[:5])
                + "), captured by the model or pred_readout rather than passed in the pose. "
                "Gradients cannot flow back through it: put that tensor in the poses (its "
                "gradient then continues upstream) or detach it."
            )
        if leaves:
            layout = ParamLayout(self.params + tuple(leaves), self.device)
            self.targets = GradTargets(layout, self.pose_inputs)
        # Every later graph is walked too (some tens of microseconds): a closure used for
        # some poses only, or a tensor hidden in a pose object that cannot be looked
        # into, would otherwise lose its gradient without a word.
        self.discovered = True

    def verify(self, pred: Tensor, aliases: Aliases, start: int) -> None:
        """Raise if ``pred`` reaches a tensor that requires grad and is not a target."""
        if not pred.requires_grad:
            return
        known = {id(t) for t in self.targets.layout.params} | {id(a) for a in aliases.values()}
        leaves, foreign, hit = _reached(pred, known, self._mark)
        leaves = [t for t in leaves if id(t) not in self._private]
        self._mark_used(hit, aliases)
        if leaves or foreign:
            found = [f"a {t.dtype} leaf of shape ({', '.join(map(str, t.shape))})" for t in leaves]
            raise CombinationError(
                f"{self.what(start, pred.numel())} reach{'es' if pred.numel() == 1 else ''} "
                + "; ".join((found + foreign)[:5])
                + ", which requires grad but was not reached by the first chunk run with a "
                "graph, so its gradient cannot be returned. Keep tensors that require grad "
                "in the poses as tensors, mappings, lists, tuples or dataclass fields (other "
                "objects hide them), and make parameters outside the model reachable from "
                "every pose."
            )

    def grads(
        self,
        pred: Tensor,
        aliases: Aliases,
        weight: Tensor | None = None,
        retain: bool = False,
    ) -> tuple[Sequence[Tensor], list[tuple[int, Tensor]]]:
        """Gradients of ``pred`` (weighted by ``weight``) w.r.t. every target.

        Returns the parameters' gradients (zeros for unused ones; see ``used``) and
        ``(slot, grad)`` for each pose tensor of the chunk.
        """
        params = self.targets.layout.params
        slots = [self.targets.slots[k] for k in aliases]
        inputs = params + tuple(aliases.values())
        # A parameter frozen since the forward gets zeros, which autograd then drops
        # (as the full graph does: its accumulator skips a tensor that no longer
        # requires grad).
        live = [t for t in inputs if t.requires_grad]
        if weight is not None:
            # The weighted sum as the output, rather than grad_outputs: autograd checks
            # grad_outputs' shapes symbolically, which costs more than the two nodes.
            pred, weight = (pred * weight).sum(), None
        with _held_hooks(live):
            got = torch.autograd.grad(
                pred,
                live,
                grad_outputs=weight,
                retain_graph=retain,
                allow_unused=True,
                materialize_grads=True,
            )
        if len(live) < len(inputs):
            found = iter(got)
            got = tuple(next(found) if t.requires_grad else torch.zeros_like(t) for t in inputs)
        n = len(params)
        return got[:n], list(zip(slots, got[n:], strict=True))

    # ---- helpers -----------------------------------------------------------------------
    def _watched(self, watch: _Watch, poses: Sequence[Any], start: int) -> None:
        """Take note of what a watched run saw: hooks, and leaves made in the model.

        Raises
        ------
        CombinationError
            If the model made a tensor of a pose require grad (``pos.requires_grad_()``):
            the full graph would give that tensor a gradient, which combframe can only
            return for tensors that require grad before the call. The flag is put back.
        """
        self.activation_hooks |= watch.hooks or any(map(_module_backward_hooks, self.modules))
        self._private = set(watch.made)
        if not watch.made:
            return
        self.makes_leaves = True
        mine = {id(t) for leaves in self.leaves[start : start + len(poses)] for t in leaves}
        flipped = [t for k, t in watch.made.items() if k in mine]
        if flipped:
            for t in self.inert:
                t.requires_grad_(False)
            shape = ", ".join(map(str, flipped[0].shape))
            raise CombinationError(
                f"the model made a tensor of {self.what(start, len(poses))} (shape ({shape})) "
                "require grad inside its forward (pos.requires_grad_()); its gradient can "
                "only be returned for a pose tensor that requires grad before the call. Set "
                "requires_grad on the poses' tensors before calling MultiPoseModel (they "
                "then get their gradients, as in the full graph), or make a private leaf in "
                "the model (pos = pos.detach().requires_grad_()), which gets none"
            )

    def _mark_used(self, hit: set[int], aliases: Aliases, leaves: Sequence[Tensor] = ()) -> None:
        """Record the targets a graph reached (a pose tensor through its stand-in)."""
        self.used |= hit
        self.used.update(orig for orig, alias in aliases.items() if id(alias) in hit)
        self.used.update(id(t) for t in leaves)

    def what(self, start: int, b: int) -> str:
        """Name pose ``start`` or the chunk of ``b`` poses from it, for messages."""
        return what(start, b)

    def place(self, index: int, pose: Any, aliases: Aliases | None = None) -> Any:
        """Pose ``index`` as the model gets it: stand-ins substituted, moved to the device.

        Rebuilt from the leaves :meth:`scan` found, and only when one of them changes:
        otherwise ``pose`` itself.
        """
        if not aliases and not self.move_poses:
            return pose
        leaves = self.leaves[index]
        placed = [aliases.get(id(t), t) for t in leaves] if aliases else leaves
        if self.move_poses:
            placed = [self._check_device(index, t) for t in placed]
        if all(map(operator.is_, placed, leaves)):
            return pose
        return self.rebuilds[index](placed)

    def _check_device(self, index: int, t: Tensor) -> Tensor:
        if t.device == self.device:
            return t
        if self.move_poses:
            return t.to(self.device, non_blocking=True)
        raise CombinationError(
            f"pose {index} holds a tensor on {t.device}, but the model is on {self.device}. "
            "Move the poses to the model's device, or pass move_poses=True to MultiPoseModel"
        )
