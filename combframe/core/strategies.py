r"""Gradient strategies: how the gradients of the per-pose predictions are obtained.

Each strategy runs the single-pose model over the flat list of poses of a batch of
compounds, ``chunk_size`` poses per pass, never holding more than one chunk's autograd
graph, and returns the detached ``(M,)`` predictions and a
:class:`~combframe.core.gradients.PoseGradients` that answers the backward.

=========  ===========================================  ===============================
strategy   held between forward and backward            losses supported
=========  ===========================================  ===============================
store      ``(M, P)`` per-pose gradients                any (combined and per-pose)
recompute  the poses and their RNG states; one ``P``    any
           accumulator during backward
stream     ``k`` running ``P``-sums per compound        combined predictions only
           (online softmax)
=========  ===========================================  ===============================

Gradients go to every input of the pose graph: the model's (and the readout's) trainable
parameters, tensors inside the poses that require grad, and leaf tensors the graph
reaches through a closure (found by walking the graph of the first chunk run with one).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, final

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from typing_extensions import override

from combframe.core.batch import Segments, default_collate, each_tensor, map_tensors
from combframe.core.combination import Combination, StreamingCombination
from combframe.core.gradients import GradTargets, ParamLayout, PoseGradients, StoredGradients
from combframe.errors import CombinationError, StrategyError, StrategyWarning, user_stacklevel
from combframe.segment import segment_max, segment_sum

__all__ = [
    "STRATEGIES",
    "PoseRunner",
    "Recompute",
    "Store",
    "Strategy",
    "Stream",
    "resolve_strategy",
]

Aliases = dict[int, Tensor]
#: The poses of a batch of compounds, flat.
Poses = Sequence[Any]
#: What a strategy's forward gives: the detached ``(M,)`` predictions and their gradients.
Collected = tuple[Tensor, PoseGradients]


def _graph_mark() -> int:
    """Return a sequence number below that of every autograd node created from now on."""
    with torch.enable_grad():
        probe = torch.empty(0, requires_grad=True)
        node = probe.view(0).grad_fn
    assert node is not None
    return int(node._sequence_nr())


def _reached(y: Tensor, known: set[int], mark: int) -> tuple[list[Tensor], list[str], set[int]]:
    """Walk ``y``'s graph: unknown leaves, foreign nodes, and the known leaves reached.

    Returns the leaves not in ``known``, the foreign nodes, and the ids of the ``known``
    leaves the graph reaches. A node older than ``mark`` belongs to a graph built before
    the chunk ran. Below it, reaching only known leaves is harmless (autocast's cache of a
    parameter's cast); an unknown leaf there means a tensor that requires grad was
    computed outside the model and captured by it, and the old node is reported.
    """
    leaves: dict[int, Tensor] = {}
    foreign: list[str] = []
    hit: set[int] = set()
    seen: set[tuple[Any, str]] = set()
    stack: list[tuple[Any, str]] = [(y.grad_fn, "")]
    while stack:
        node, old = stack.pop()
        if node is None or (node, old) in seen:
            continue
        seen.add((node, old))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if id(variable) in known:
                hit.add(id(variable))
            else:
                if old:
                    shape = ", ".join(map(str, variable.shape))
                    foreign.append(f"{old} -> a {variable.dtype} leaf of shape ({shape})")
                else:
                    leaves.setdefault(id(variable), variable)
            continue
        if not old and node._sequence_nr() < mark and not _cached_cast(node):
            old = node.name()
        stack.extend((next_node, old) for next_node, _ in node.next_functions)
    return list(leaves.values()), foreign, hit


def _cached_cast(node: Any) -> bool:
    """Whether ``node`` is autocast's cached cast of a leaf (reused across calls)."""
    return bool(node.name() == "ToCopyBackward0") and all(
        hasattr(nxt, "variable") for nxt, _ in node.next_functions if nxt is not None
    )


class _Watch(TorchFunctionMode):
    """Notes what a model does inside forward that the strategies must know about.

    ``hooks``: a ``register_hook`` call (a hook on an activation, or on an input);
    ``made``: tensors that did not require grad and were made to (``requires_grad_``,
    ``t.requires_grad = True``, a factory called with ``requires_grad=True``), by id.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hooks = False
        self.made: dict[int, Tensor] = {}

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args and isinstance(args[0], Tensor) else None
        before = target is not None and target.requires_grad
        out = func(*args, **kwargs)
        if name == "register_hook":
            self.hooks = True
        elif name in ("requires_grad_", "__set__") and target is not None:
            if target.requires_grad and not before:
                self.made[id(target)] = target
        elif kwargs.get("requires_grad") and isinstance(out, Tensor) and out.is_leaf:
            self.made[id(out)] = out
        return out


def _module_backward_hooks(model: torch.nn.Module) -> bool:
    """Whether a module backward hook (``register_full_backward_hook``) can fire."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in model.modules())


@contextlib.contextmanager
def _held_hooks(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Hold back the tensor hooks of leaves while a pose's own gradient is computed.

    The full graph runs a hook registered on a parameter once, on its total gradient;
    combframe's backward hands that total to the parameter, where the hook then runs.
    Per-pose and per-chunk gradients are parts of it, on which the hook must not run.
    """
    # The hook autograd runs for a tensor's Python hooks reads their dict when it fires:
    # emptied for the duration, it runs none (hooks registered from C++ are untouched).
    held = [(hooks, dict(hooks)) for t in tensors if (hooks := t._backward_hooks)]
    for hooks, _ in held:
        hooks.clear()
    try:
        yield
    finally:
        for hooks, saved in held:
            hooks.update(saved)


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
        self.batched = chunk_size > 1 or collate is not None
        self.collate = collate or default_collate
        self.pose_inputs: tuple[Tensor, ...] = ()
        self.targets = GradTargets(ParamLayout(self.params, device))
        self.discovered = False
        #: Ids of the targets some pose graph run so far has reached (see ``discover``).
        self.used: set[int] = set()
        self._mark = 0
        self.readers: list[list[int]] = []
        self.inert: tuple[Tensor, ...] = ()
        #: Whether a run with a graph met a gradient hook on a tensor other than a
        #: parameter (``Tensor.register_hook`` inside forward, a module backward hook).
        self.activation_hooks = False
        #: Whether the model makes leaves of its own inside forward (forces): every later
        #: run with a graph is then watched too, to tell them from captured tensors.
        self.makes_leaves = False
        self._private: set[int] = set()

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
        for i, pose in enumerate(poses):
            for t in each_tensor(pose):
                if not self.move_poses:
                    self._check_device(i, t)
                if grad and t.requires_grad and id(t) not in params:
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
        self.targets = GradTargets(ParamLayout(self.params, self.device), self.pose_inputs)

    def chunks(self, m: int, start: int = 0) -> list[tuple[int, int]]:
        """``(start, stop)`` of each chunk of a flat list of ``m`` poses."""
        step = self.chunk_size
        return [(s, min(s + step, m)) for s in range(start, m, step)]

    # ---- running ---------------------------------------------------------------------
    def aliases(self, poses: Sequence[Any]) -> Aliases:
        """Fresh leaves standing in for the pose tensors that require grad.

        The model runs on these, so that gradients stop at the pose tensors (and reach
        whatever produced them through the Function's inputs, exactly once).
        """
        if not self.pose_inputs:
            return {}
        slots = self.targets.slots
        out: Aliases = {}
        for pose in poses:
            for t in each_tensor(pose):
                if id(t) in slots and id(t) not in out:
                    out[id(t)] = t.detach().requires_grad_(True)
        return out

    def predict(self, poses: Sequence[Any], start: int, aliases: Aliases | None = None) -> Tensor:
        """Return the ``(b,)`` predictions of ``b`` poses (with a graph in grad mode)."""
        if torch.is_grad_enabled():
            self._mark = _graph_mark()
        placed = [
            self._place(start + k, self._substitute(pose, aliases)) for k, pose in enumerate(poses)
        ]
        batch = self.collate(placed) if self.batched else placed[0]
        if torch.is_grad_enabled() and (not self.discovered or self.makes_leaves):
            watch = _Watch()
            with watch:
                out = self.model(batch)
            self._watched(watch, poses, start)
        else:
            out = self.model(batch)
        if not isinstance(out, Tensor):
            raise CombinationError(
                f"the model returned {type(out).__name__} for {self.what(start, len(poses))}; "
                "it must return a tensor with one element per pose (the prediction)"
            )
        if self.pred_readout is not None:
            out = self.pred_readout(out)
        if out.numel() != len(poses):
            if not self.batched:
                raise CombinationError(
                    f"the model's prediction for pose {start} has shape {tuple(out.shape)}; "
                    "it must have exactly one element. Reduce it in the model (e.g. .sum()) "
                    "or pass pred_readout"
                )
            raise CombinationError(
                f"the model returned shape {tuple(out.shape)} for "
                f"{self.what(start, len(poses))}; with chunk_size={self.chunk_size} it must "
                f"return one prediction per pose of the collated batch ({len(poses)} "
                "elements), e.g. a per-graph sum over the batch vector"
            )
        out = out.reshape(len(poses))
        if self.discovered and torch.is_grad_enabled():
            self.verify(out, aliases or {}, start)
        return out

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

        Returns the parameters' gradients (zeros for unused ones; see ``used``) and ``(slot, grad)``
        for each pose tensor of the chunk.
        """
        params = self.targets.layout.params
        slots = [self.targets.slots[k] for k in aliases]
        inputs = params + tuple(aliases.values())
        # A parameter frozen since the forward gets zeros, which autograd then drops
        # (as the full graph does: its accumulator skips a tensor that no longer
        # requires grad).
        live = [t for t in inputs if t.requires_grad]
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
        self.activation_hooks |= watch.hooks or any(map(_module_backward_hooks, _modules(self)))
        self._private = set(watch.made)
        if not watch.made:
            return
        self.makes_leaves = True
        mine = {id(t) for pose in poses for t in each_tensor(pose)}
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
        return f"pose {start}" if b == 1 else f"the chunk of poses {start}..{start + b - 1}"

    @staticmethod
    def _substitute(pose: Any, aliases: Aliases | None) -> Any:
        if not aliases:
            return pose
        return map_tensors(pose, lambda t: aliases.get(id(t), t))

    def _place(self, index: int, pose: Any) -> Any:
        if not self.move_poses:
            return pose
        return map_tensors(pose, lambda t: self._check_device(index, t))

    def _check_device(self, index: int, t: Tensor) -> Tensor:
        if t.device == self.device:
            return t
        if self.move_poses:
            return t.to(self.device, non_blocking=True)
        raise CombinationError(
            f"pose {index} holds a tensor on {t.device}, but the model is on {self.device}. "
            "Move the poses to the model's device, or pass move_poses=True to MultiPoseModel"
        )


class Strategy(ABC):
    """How the gradients of the per-pose predictions are collected.

    Subclasses implement :meth:`collect`. ``supports_pose_losses`` says whether a loss on
    the per-pose predictions is supported.
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@contextlib.contextmanager
def undo_side_effects(runner: PoseRunner) -> Iterator[None]:
    """Run a look-ahead pass whose RNG draws and buffer updates leave no trace.

    The pass runs on copies of the buffers, so the model's own buffers are never written
    (their version counters do not move, and a graph built earlier that saved one stays
    valid).
    """
    copies = {id(b): b.clone() for b in _module_buffers(runner)}
    devices = [runner.device] if runner.device.type != "cpu" else []
    with (
        stand_in_buffers(runner, copies),
        torch.random.fork_rng(devices=devices, device_type=runner.device.type),
    ):
        yield


@contextlib.contextmanager
def stand_in_buffers(runner: PoseRunner, values: dict[int, Tensor]) -> Iterator[None]:
    """Run the body with the buffers whose ids are keys of ``values`` replaced by them.

    The modules hold the stand-ins only for the duration: whatever the body writes into
    a buffer lands in its stand-in, and the module's own tensor keeps its value and its
    version counter.
    """
    swapped: list[tuple[torch.nn.Module, str, Tensor]] = []
    if values:
        for top in _modules(runner):
            for module in top.modules():
                for name, b in module._buffers.items():
                    if b is not None and id(b) in values:
                        swapped.append((module, name, b))
                        module._buffers[name] = values[id(b)]
    try:
        yield
    finally:
        for module, name, b in swapped:
            module._buffers[name] = b


def _first_graph(
    strategy: Strategy, runner: PoseRunner, poses: Sequence[Any], stop: int, start: int = 0
) -> tuple[Tensor, Aliases]:
    """Run poses ``[start, stop)`` with a graph, check it and find the targets it reaches.

    Raises
    ------
    StrategyError
        If the model has a gradient hook on an activation that ``strategy`` cannot honour.
    """
    with torch.enable_grad():
        aliases = runner.aliases(poses[start:stop])
        pred = runner.predict(poses[start:stop], start, aliases)
    runner.require_grad(pred, start)
    runner.discover(pred, aliases)
    if runner.activation_hooks and not strategy.activation_hooks:
        raise StrategyError(
            "the model has a gradient hook on a tensor other than a parameter "
            "(Tensor.register_hook inside forward, or a module backward hook such as "
            f"register_full_backward_hook); strategy={strategy.name!r} computes "
            + (
                "each pose's gradient before the loss is known"
                if strategy.supports_pose_losses
                else "running sums weighted by the combination alone"
            )
            + ", so such a hook would not see the c_i * dy_i/dh the full graph gives it. "
            "Use strategy='recompute', which back-propagates each chunk with its "
            "coefficients, or remove the hook (hooks on parameters, param.register_hook, "
            "work with every strategy)"
        )
    return pred, aliases


@final
class Store(Strategy):
    """Store each pose's gradient in one preallocated ``(M, P)`` buffer (the default).

    Costs M forward and backward passes plus one ``M x P`` matrix-vector product, and
    ``M * P`` numbers of memory between forward and backward.

    With ``chunk_size > 1`` per-pose gradients are per-sample gradients: they are
    computed for a whole chunk at once with :func:`torch.func.vmap` when the model can be
    vmapped over poses of one shape (the default collate, no pose tensor requiring grad,
    no parameter reached through a closure or a readout module, no randomness and no
    buffer updated in place). Otherwise store runs one pose per pass (each pose collated
    alone) and warns once per model with :class:`~combframe.errors.StrategyWarning`.

    A model with a gradient hook on an activation is refused (each pose's gradient is
    taken before the loss is known); hooks on parameters run once, on the total.
    """

    name = "store"

    def __init__(self) -> None:
        self._warned: set[int] = set()

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        m = len(poses)
        preview = _preview(runner, poses) if runner.batched and m > 1 else None
        buffers = _module_buffers(runner) if runner.batched and m > 1 else []
        versions = [b._version for b in buffers]
        values = {k: b.clone() for k, b in enumerate(buffers)} if _training(runner) else None
        with _one_pose_errors(runner, 0):
            pred, aliases = _first_graph(self, runner, poses, 1)
        targets = runner.targets
        layout = targets.layout
        buffer = layout.new_buffer(m)
        rows = _PoseRows(runner, layout.device)
        self._warn_shared(runner, rows, buffer)
        preds = [pred.detach()]
        self._store(runner, pred, aliases, 0, buffer, rows)
        del pred, aliases
        start = 1
        if runner.batched and m > 1:
            mutated = bool(changed_buffers(buffers, versions, values))
            del values
            if mutated and preview is not None:
                preview = preview[:1]  # pose 1 on starts from the buffers pose 0 left
            if self._in_chunks(runner, poses, buffer, preds, mutated):
                start = m
        for i in range(start, m):
            with torch.enable_grad(), _one_pose_errors(runner, i):
                aliases = runner.aliases(poses[i : i + 1])
                pred = runner.predict(poses[i : i + 1], i, aliases)
                runner.require_grad(pred, i)
                self._store(runner, pred, aliases, i, buffer, rows)
            preds.append(pred.detach())
            del pred, aliases  # free before the next pose's graph is built
        if preview is not None:
            _check_independent(runner, torch.cat(preds)[: preview.shape[0]], preview)
        source = StoredGradients(targets, buffer, rows.pairs(), runner.used)
        source.watch(poses)
        return torch.cat(preds), source

    def _in_chunks(
        self,
        runner: PoseRunner,
        poses: Poses,
        buffer: Tensor,
        preds: list[Tensor],
        mutated: bool,
    ) -> bool:
        """Fill the rows of poses 1 on by per-sample gradients of whole chunks, if possible.

        Returns whether it did; otherwise warns why (once per model) and leaves ``preds``
        holding pose 0's prediction only.
        """
        reason = _per_sample_obstacle(runner) or (_UPDATES_BUFFERS if mutated else None)
        if reason is None and _hidden_parameters(runner, poses[0]):
            reason = (
                "the model uses a parameter other than through its registered name (a "
                "closure or a list holding it), which torch.func.vmap cannot see"
            )
        if reason is None:
            try:
                reason = _per_sample_chunks(runner, poses, buffer, preds)
            except Exception as exc:  # not vmappable: fall back for the rest
                reason = f"torch.func.vmap failed ({type(exc).__name__}: {exc})"
        if reason is None:
            return True
        del preds[1:]  # whatever the attempt computed is dropped; it wrote no buffer
        self._warn(runner, reason)
        return False

    @staticmethod
    def _store(
        runner: PoseRunner,
        pred: Tensor,
        aliases: Aliases,
        i: int,
        buffer: Tensor,
        rows: _PoseRows,
    ) -> None:
        with torch.enable_grad():
            params, pose = runner.grads(pred, aliases)
        runner.targets.layout.flatten_into(params, buffer[i])
        rows.write(i, pose)

    def _warn_shared(self, runner: PoseRunner, rows: _PoseRows, buffer: Tensor) -> None:
        """Warn once per model when copies of shared pose tensors' gradients dominate."""
        shared = rows.shared_bytes()
        if shared <= max(buffer.numel() * buffer.element_size(), 1 << 20):
            return
        key = -id(runner.model)
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(
            f"strategy='store' keeps each pose's gradient with respect to the pose tensors "
            f"that several poses share: {shared / 2**20:.1f} MiB until backward, more than "
            "the per-pose gradients of the parameters. Each pose's coefficient is known "
            "only in backward, so store cannot sum them as they come; strategy="
            "'recompute' or 'stream' keep one copy",
            StrategyWarning,
            stacklevel=user_stacklevel(),
        )

    def _warn(self, runner: PoseRunner, reason: str) -> None:
        if id(runner.model) in self._warned:
            return
        self._warned.add(id(runner.model))
        warnings.warn(
            f"strategy='store' with chunk_size={runner.chunk_size} runs one pose per pass "
            f"for this model: {reason}. Per-pose gradients of a chunk need a model that "
            "torch.func.vmap can map over poses of one shape. strategy='recompute' or "
            "'stream' run whole chunks for any model.",
            StrategyWarning,
            stacklevel=user_stacklevel(),
        )


@final
class _PoseRows:
    """Each pose's gradients with respect to the pose tensors it holds, stacked per tensor.

    One ``(k, *shape)`` tensor per pose tensor held by ``k`` poses, allocated once and
    written as the poses run (never a list of gradients stacked again at the end).
    """

    def __init__(self, runner: PoseRunner, device: torch.device) -> None:
        inputs = runner.targets.pose_inputs
        self.index = [torch.tensor(r, dtype=torch.long, device=device) for r in runner.readers]
        self.row = [{i: k for k, i in enumerate(r)} for r in runner.readers]
        self.stacked = [
            torch.empty((len(r), *t.shape), dtype=t.dtype, device=t.device)
            for r, t in zip(runner.readers, inputs, strict=True)
        ]

    def write(self, i: int, pose: Sequence[tuple[int, Tensor]]) -> None:
        """Write pose ``i``'s gradients (``(slot, gradient)`` pairs)."""
        for slot, g in pose:
            self.stacked[slot][self.row[slot][i]] = g.detach()

    def shared_bytes(self) -> int:
        """Bytes held for pose tensors that more than one pose holds."""
        return sum(t.numel() * t.element_size() for t in self.stacked if t.shape[0] > 1)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(poses, stacked gradients)`` per pose tensor, as StoredGradients takes them."""
        return list(zip(self.index, self.stacked, strict=True))


@contextlib.contextmanager
def _one_pose_errors(runner: PoseRunner, index: int) -> Iterator[None]:
    """Say why store ran a pose alone when the model fails on a batch of one."""
    try:
        yield
    except CombinationError:
        raise
    except Exception as exc:
        if not runner.batched:
            raise
        raise CombinationError(
            f"strategy='store' runs pose {index} alone to get its own gradient, and the "
            f"model failed on that batch of one ({type(exc).__name__}: {exc}). A model "
            "that needs several poses per batch (batch norm in training mode) cannot give "
            "per-pose gradients; use strategy='recompute' or 'stream', which run whole chunks"
        ) from exc


def _preview(runner: PoseRunner, poses: Poses) -> Tensor | None:
    """Return the first chunk's predictions as recompute and stream get them, or None.

    Run without a graph and leaving no trace; store compares them with its one-pose
    predictions (in either mode) to check that the model treats the poses of a batch
    independently, which per-pose gradients assume, and the run checks the model's
    output per batch. A model that draws random numbers cannot be compared (a batch
    draws other numbers than its poses alone): None.
    """
    with undo_side_effects(runner), torch.no_grad():
        drawn = _capture_rng(runner.device, None)
        preview = runner.predict(poses[: runner.chunk_size], 0)
        return preview if _capture_rng(runner.device, drawn) is drawn else None


def _check_independent(runner: PoseRunner, alone: Tensor, together: Tensor) -> None:
    """Raise if the first chunk's batched predictions differ from one-pose predictions."""
    scale = together.abs().clamp_min(1.0)
    tol = max(1e3 * torch.finfo(together.dtype).eps, 1e-9)
    if bool(((alone.to(together.dtype) - together).abs() <= tol * scale).all()):
        return
    raise CombinationError(
        f"the model's predictions for the batch of poses 0..{together.shape[0] - 1} "
        f"({together.tolist()[:4]}...) differ from its predictions one pose at a time "
        f"({alone.tolist()[:4]}...): it mixes the poses of a batch. strategy='store' needs "
        "each pose's own gradient and runs poses alone; use strategy='recompute' or "
        "'stream', which run whole chunks (and see docs/batched.md on such models)"
    )


def _per_sample_obstacle(runner: PoseRunner) -> str | None:
    """Why per-sample gradients by ``torch.func`` cannot serve this run, or None."""
    if runner.collate is not default_collate:
        return "a custom collate (poses of different sizes cannot be vmapped)"
    if runner.pose_inputs:
        return "pose tensors require grad"
    if len(runner.targets.layout.params) != len(_named_trainable(runner.model)):
        return "parameters outside the model (a readout module or a closure) require grad"
    named = list(runner.model.named_parameters(remove_duplicate=False))
    if len(named) != len(dict(runner.model.named_parameters())):
        return "the model shares a parameter between modules"
    return None


def _hidden_parameters(runner: PoseRunner, pose: Any) -> bool:
    """Whether the model reaches a parameter other than through its registered name.

    Runs one pose through ``torch.func.functional_call`` with fresh copies of the
    parameters and walks the graph: the original parameters must not appear in it (a
    closure or a list holding one would keep using it, out of torch.func's sight).
    """
    from torch.func import functional_call

    model = runner.model
    trainable, fixed = _functional_state(model)
    copies = {n: p.detach().requires_grad_(True) for n, p in trainable.items()}
    with undo_side_effects(runner), torch.enable_grad():
        mark = _graph_mark()
        out = functional_call(
            model, {**copies, **fixed}, (default_collate([runner._place(0, pose)]),)
        )
        if runner.pred_readout is not None:
            out = runner.pred_readout(out)
    if not isinstance(out, Tensor) or out.grad_fn is None:
        return False
    leaves, _, _ = _reached(out, {id(c) for c in copies.values()}, mark)
    originals = {id(p) for p in trainable.values()}
    return any(id(leaf) in originals for leaf in leaves)


def _per_sample_chunks(
    runner: PoseRunner, poses: Sequence[Any], buffer: Tensor, preds: list[Tensor]
) -> str | None:
    """Fill ``buffer`` rows from 1 on by per-sample gradients; append the predictions.

    The first chunk also recomputes pose 0, whose row autograd already wrote: if the two
    disagree (a parameter the model reaches other than through its registered name),
    the rest falls back to one pose per pass. Returns why it stopped, or None.
    """
    trainable, fixed = _functional_state(runner.model)
    # The attempt runs on copies of the buffers: a buffer it writes is found afterwards
    # and the model's own are left as they were.
    named = dict(runner.model.named_buffers())
    copies = {n: b.clone() for n, b in named.items()}
    versions = [b._version for b in copies.values()]
    fixed.update(copies)
    tol = 256 * torch.finfo(buffer.dtype).eps
    for s, e in runner.chunks(len(poses)):
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
    original = {k: b for k, b in enumerate(named.values())}
    if changed_buffers(list(copies.values()), versions, original):
        return _UPDATES_BUFFERS
    return None


_UPDATES_BUFFERS = (
    "the model updates buffers in place (batch-norm statistics, the power iteration of "
    "spectral norm), once per call, so a chunk is not the same as its poses one by one"
)


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
    """Write the chunk's per-pose gradients into ``out`` (one row per pose); return preds.

    ``state`` is the trainable parameters by name and the rest ``functional_call`` needs.
    """
    from torch.func import functional_call, grad, vmap

    model = runner.model
    trainable, fixed = state
    readout = runner.pred_readout

    def predict_one(params: dict[str, Tensor], pose: Any) -> tuple[Tensor, Tensor]:
        pred = functional_call(model, {**params, **fixed}, (default_collate([pose]),))
        if readout is not None:
            pred = readout(pred)
        if pred.numel() != 1:
            raise CombinationError(
                f"the model returned shape {tuple(pred.shape)} for a chunk of one pose"
            )
        pred = pred.reshape(())
        return pred, pred.detach()

    batch = default_collate([runner._place(start + k, p) for k, p in enumerate(poses)])
    per_pose = vmap(grad(predict_one, has_aux=True), in_dims=(None, 0), randomness="error")
    grads, preds = per_pose(trainable, batch)
    b = len(poses)
    torch.cat([grads[n].detach().reshape(b, -1) for n in trainable], dim=1, out=out)
    result: Tensor = preds.detach().reshape(b)
    return result


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
    r"""Forward without graphs; backward re-runs each chunk and back-propagates its ``c``.

    Memory stays flat in the number of poses: one chunk graph and one ``P``-sized
    accumulator. The last chunk runs with a graph in the forward (to validate the
    prediction and find what it depends on) and that graph is kept for the backward,
    which starts with it; the other chunks are re-run. Each chunk's backward is one
    ``autograd.grad`` with
    ``grad_outputs`` = the chunk's coefficients :math:`c_i = \partial L/\partial y_i`.
    The RNG state of each chunk is saved and restored, so dropout replays identically,
    and the autocast state of the forward is restored. Each chunk's re-run starts
    from the buffers (batch-norm running statistics) as they were before
    that chunk's forward, on copies swapped in for the re-run, so the buffers are updated
    once per chunk and the model's own are never written back.
    A pose tensor modified in place between forward and backward is refused (its version
    counter moved, as autograd checks for saved tensors). Chunks whose coefficients are
    all exactly zero (a sharp smooth-max far from the best pose) are not re-run: they
    contribute nothing. Gradient hooks on activations see what the full graph gives them.

    Parameters
    ----------
    check
        Compare every re-run prediction with the forward's (to within a few units in the
        last place, so non-deterministic GPU reductions pass) and raise
        :class:`~combframe.StrategyError` naming the poses if they differ, before any
        gradient is returned: a model that is not deterministic under the restored RNG
        state (a private ``torch.Generator``) would otherwise get gradients of another
        function. One host sync per backward. Pass ``False`` for a model known to be
        deterministic. Chunks skipped because their coefficients are zero are not
        checked.
    """

    name = "recompute"
    activation_hooks = True

    def __init__(self, check: bool = True) -> None:
        self.check = check

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        chunks = runner.chunks(len(poses))
        rng: list[_RngState] = []
        preds = []
        autocast = _AutocastState.capture(runner.device.type)
        kept: tuple[Tensor, Aliases] | None = None
        last = len(chunks) - 1
        log = _BufferLog(_module_buffers(runner), by_value=_training(runner))
        for k, (s, e) in enumerate(chunks):
            rng.append(_capture_rng(runner.device, rng[-1] if rng else None))
            log.start_chunk()
            if k == last:
                # The last chunk runs with a graph, so that a prediction that does not
                # depend on anything trainable is refused now, not in backward, and the
                # leaves the graph reaches become targets. Its graph is kept for the
                # backward, which starts with it: one chunk graph alive at any time.
                kept = _first_graph(self, runner, poses, e, s)
                pred = kept[0]
            else:
                with torch.no_grad():
                    pred = runner.predict(poses[s:e], s)
            log.end_chunk()
            preds.append(pred.detach())
            del pred
        log.finish()
        stacked = torch.cat(preds)
        state = _ChunkState(rng, autocast, log)
        return stacked, _RecomputedGradients(
            runner, list(poses), chunks, state, stacked, self.check, kept
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
        chunks: list[tuple[int, int]],
        state: _ChunkState,
        preds: Tensor,
        check: bool,
        kept: tuple[Tensor, Aliases] | None,
    ) -> None:
        super().__init__(runner.targets, runner.used)
        self.runner = runner
        self.poses = poses
        self.chunks = chunks
        self.state = state
        self.preds = preds
        self.check = check
        self.kept = kept
        self.deviation: list[tuple[int, int, Tensor]] = []
        self.watch(poses)

    def _rerun(self, k: int) -> tuple[Tensor, Aliases]:
        """Chunk ``k``'s predictions with a graph: kept from the forward, or re-run."""
        runner = self.runner
        if k == len(self.chunks) - 1 and self.kept is not None:
            kept, self.kept = self.kept, None  # used once; a second backward re-runs
            return kept
        s, e = self.chunks[k]
        state = self.state
        stand_ins = state.buffers.before(k)
        with (
            stand_in_buffers(runner, stand_ins),
            _replay_rng(state.rng[k], runner.device),
            torch.enable_grad(),
            state.autocast.restore(),
        ):
            aliases = runner.aliases(self.poses[s:e])
            pred = runner.predict(self.poses[s:e], s, aliases)
        runner.require_grad(
            pred,
            s,
            " (found when the backward re-ran it: recompute's forward runs only its last "
            "chunk with a graph; no gradient has been written)",
        )
        if self.check:  # compared once for all chunks, at the end of the backward
            got, want = pred.detach(), self.preds[s:e].to(pred.dtype)
            tol = min(64 * torch.finfo(got.dtype).eps, 1e-3)
            self.deviation.append((s, e, (got - want).abs() / (tol * want.abs().clamp_min(1.0))))
        return pred, aliases

    def _verify(self) -> None:
        """Raise if a re-run prediction left the tolerance (one host sync)."""
        if not self.deviation:
            return
        poses = [i for s, e, _ in self.deviation for i in range(s, e)]
        ratios = torch.cat([d for *_, d in self.deviation])
        self.deviation = []
        if not bool((ratios > 1).any()):
            return
        bad = [poses[i] for i in torch.nonzero(ratios > 1).flatten().tolist()]
        raise StrategyError(
            f"the backward re-ran poses {bad[:10]} and got different predictions than the "
            f"forward (for pose {bad[0]}: {self.preds[bad[0]].item()!r} in the forward): "
            "the model is not deterministic under the restored RNG state and buffers, so "
            "recompute would return the gradients of another function. Likely causes: a "
            "private torch.Generator or another source of randomness that is not the global "
            "RNG, or state the model changes outside its buffers. Use strategy='store' (no "
            "re-run), or Recompute(check=False) if the difference is known to be harmless"
        )

    def contract(self, coeffs: Tensor) -> list[Tensor | None]:
        runner = self.runner
        layout = self.layout
        flat = torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device)
        acc = layout.views(flat)
        pose_acc: list[Tensor | None] = [None] * len(self.targets.pose_inputs)
        # One host sync per backward: chunks whose c_i are all zero contribute nothing.
        step = runner.chunk_size
        active = sorted({i // step for i in torch.nonzero(coeffs).flatten().tolist()})
        # A skipped chunk still runs forward if it holds a pose tensor no graph has
        # reached yet: reached, the tensor gets a gradient of zeros, as in the full graph.
        unseen = [
            runner.readers[slot]
            for slot, t in enumerate(self.targets.pose_inputs)
            if id(t) not in runner.used
        ]
        probe = sorted({i // step for poses in unseen for i in poses} - set(active))
        order = sorted(active + probe)
        if self.kept is not None and order and order[-1] == len(self.chunks) - 1:
            order = [order[-1], *order[:-1]]  # the kept graph first, then re-runs
        else:
            self.kept = None  # the last chunk contributes nothing: free its graph
        try:
            for k in order:
                s, e = self.chunks[k]
                pred, aliases = self._rerun(k)
                if k in probe:
                    del pred, aliases
                    continue
                with torch.enable_grad():
                    params, pose = runner.grads(pred, aliases, coeffs[s:e].to(pred.dtype))
                torch._foreach_add_(acc, list(params))
                for slot, g in pose:
                    prev = pose_acc[slot]
                    pose_acc[slot] = g if prev is None else prev + g
                del params, pose, pred, aliases  # free before the next chunk's graph
            self._verify()
        finally:
            self.deviation = []
        return [*layout.unflatten(flat), *pose_acc]


@dataclass(frozen=True)
class _ChunkState:
    """What recompute needs to re-run a chunk as the forward ran it."""

    rng: list[_RngState]
    autocast: _AutocastState
    buffers: _BufferLog


def changed_buffers(
    buffers: Sequence[Tensor], versions: Sequence[int], values: dict[int, Tensor] | None = None
) -> set[int]:
    """Return the indices of the buffers written since ``versions`` (``values``) were taken.

    A moved version counter says a buffer was written; with ``values`` (copies by index)
    a buffer whose value differs counts too, compared on the device with one host sync.
    """
    moved = {k for k, (b, v) in enumerate(zip(buffers, versions, strict=True)) if b._version != v}
    rest = [k for k in (values or {}) if k not in moved]
    if rest and values is not None:
        differs = torch.stack([(buffers[k] != values[k]).any() for k in rest]).tolist()
        moved.update(k for k, d in zip(rest, differs, strict=True) if d)
    return moved


@final
class _BufferLog:
    """The buffer values each chunk's forward started from, for the buffers that change.

    The forward of a model in training mode updates some buffers in place (batch-norm
    statistics); a re-run of chunk ``k`` must start from their values before chunk
    ``k``. Before the first chunk every buffer is copied once; afterwards only those
    whose version counter has moved are copied per chunk, and at the end the copies of
    buffers that never changed are dropped, so a constant buffer costs nothing per
    chunk. A re-run uses fresh stand-ins (:func:`stand_in_buffers`): the model's own
    buffers are never written back. ``by_value``: compare values too after the first
    chunk (training mode, where batch norm writes without moving version counters).
    """

    def __init__(self, buffers: list[Tensor], by_value: bool = True) -> None:
        self.buffers = buffers
        self.by_value = by_value
        self.versions = [b._version for b in buffers]
        self.initial: dict[int, Tensor] = {k: b.clone() for k, b in enumerate(buffers)}
        self.changed: set[int] = set()
        self.chunks: list[dict[int, Tensor]] = []

    def start_chunk(self) -> None:
        """Copy the buffers changed so far (the others still hold their first value)."""
        self.chunks.append({k: self.buffers[k].clone() for k in sorted(self.changed)})

    def end_chunk(self) -> None:
        """Note the buffers the chunk changed.

        After the first chunk the values are compared too (one host sync per forward):
        batch norm updates its running statistics without moving their version counters.
        """
        first = len(self.chunks) == 1 and self.by_value
        self.changed |= changed_buffers(
            self.buffers, self.versions, self.initial if first else None
        )

    def finish(self) -> None:
        """Drop the first values of the buffers no chunk changed."""
        self.initial = {k: t for k, t in self.initial.items() if k in self.changed}

    def before(self, k: int) -> dict[int, Tensor]:
        """Fresh stand-ins holding chunk ``k``'s starting values, by id of the buffer."""
        start = self.chunks[k]
        return {id(self.buffers[j]): start.get(j, self.initial[j]).clone() for j in self.changed}


def _modules(runner: PoseRunner) -> list[torch.nn.Module]:
    """Return the model and, when it is a module, the readout."""
    readout = runner.pred_readout
    return [runner.model, *([readout] if isinstance(readout, torch.nn.Module) else [])]


def _training(runner: PoseRunner) -> bool:
    return any(m.training for top in _modules(runner) for m in top.modules())


def _module_buffers(runner: PoseRunner) -> list[Tensor]:
    return [b for m in _modules(runner) for b in m.buffers()]


@final
class Stream(Strategy):
    r"""Single pass with flat memory: per-compound running sums of weighted gradients.

    The combination must implement
    :class:`~combframe.core.combination.StreamingCombination`. Exact for losses on the
    combined predictions; a loss on the per-pose predictions raises in backward.

    For each compound, with log weights :math:`a_i`, features :math:`\phi_i` (centred on
    the compound's first prediction) and running maximum :math:`m`, a chunk holding poses
    :math:`i \in B` of the compound updates, as the online softmax of FlashAttention,

    .. math::

        m' = \max(m, \max_{i \in B} a_i), \quad
        Z \leftarrow e^{m - m'} Z + \sum_{i \in B} e^{a_i - m'}, \quad
        A_j \leftarrow e^{m - m'} A_j
            + \frac{\partial}{\partial\theta} \sum_{i \in B} e^{a_i - m'} \phi_{ij}\, y_i ,

    the last term being one backward of the chunk with those weights as
    ``grad_outputs`` (so a combination with one feature, max or mean, needs one backward
    per chunk and compound in it). Every exponent is at most zero, so nothing overflows
    however widely the predictions are spread. The scalar bookkeeping is done in float64
    whatever the model's dtype; only the ``k`` sums of ``P`` numbers per compound use the
    parameters' dtype. A model with a gradient hook on an activation is refused.
    """

    name = "stream"
    supports_pose_losses = False

    @override
    def check_combination(self, combination: Combination) -> None:
        if not isinstance(combination, StreamingCombination):
            raise StrategyError(
                f"combination {combination.name!r} does not support strategy='stream' (it "
                "does not implement stream_terms/stream_coefficients); use strategy='store' "
                "or strategy='recompute'"
            )

    @override
    def collect(
        self, runner: PoseRunner, poses: Poses, segments: Segments, combination: Combination
    ) -> Collected:
        self.check_combination(combination)
        assert isinstance(combination, StreamingCombination)
        device = runner.device
        exact = _scalar_dtype(device)
        count = segments.count
        sums = _StreamSums(count, exact, device)
        preds: list[Tensor] = []
        # On the CPU reading a scalar costs nothing, so backward passes whose weights are
        # all zero (a sharp smooth-min far from the best pose) are skipped there.
        on_host = _host_scalars(device)
        for k, (s, e) in enumerate(runner.chunks(len(poses))):
            if k == 0:
                pred, aliases = _first_graph(self, runner, poses, e)
                sums.allocate(runner.targets)
            else:
                with torch.enable_grad():
                    aliases = runner.aliases(poses[s:e])
                    pred = runner.predict(poses[s:e], s, aliases)
                    runner.require_grad(pred, s)
            y = pred.detach()
            preds.append(y)
            lo, hi = segments.owner[s], segments.owner[e - 1] + 1
            if on_host:
                self._fold_host(runner, sums, combination, segments, s, pred, aliases)
                del pred, aliases  # free before the next chunk's graph is built
                continue
            local = segments.index[s:e] - lo
            weights = sums.update(combination, segments, s, y.to(exact), lo, hi, local)
            if e - s == 1:
                # One pose: one backward, then a rank-1 update of all k sums.
                with torch.enable_grad():
                    sums.add_pose(lo, weights[0], *runner.grads(pred, aliases))
            else:
                # Several poses: one backward per compound and feature, weighted.
                pairs = [(c, j) for c in range(lo, hi) for j in range(weights.shape[1])]
                last = len(pairs) - 1
                for n, (c, j) in enumerate(pairs):
                    mine = (
                        weights[:, j]
                        if hi - lo == 1
                        else torch.where(local == c - lo, weights[:, j], 0)
                    )
                    with torch.enable_grad():
                        grads = runner.grads(pred, aliases, mine.to(y.dtype), retain=n < last)
                    sums.add(c, j, *grads)
                    del grads
            del pred, aliases  # free before the next chunk's graph is built
        sums.finish()
        source = _StreamedGradients(sums, combination, runner.used)
        source.watch(poses)
        return torch.cat(preds), source

    @staticmethod
    def _fold_host(
        runner: PoseRunner,
        sums: _StreamSums,
        combination: StreamingCombination,
        segments: Segments,
        start: int,
        pred: Tensor,
        aliases: Aliases,
    ) -> None:
        """Fold one chunk in with the scalar bookkeeping on Python floats (CPU).

        Reading scalars costs nothing on the CPU, and a handful of float operations per
        pose is cheaper than the tensor operations they replace, so chunks of a few poses
        pay no overhead; backward passes whose weights are all zero (a sharp smooth
        minimum far from the best pose) are skipped, and so is the rescale while a
        compound's maximum holds.
        """
        rows = sums.update_host(combination, segments, start, pred.detach())
        owners = segments.owner[start : start + len(rows)]
        if len(rows) == 1:
            if any(rows[0]):
                with torch.enable_grad():
                    sums.add_pose_host(owners[0], rows[0], *runner.grads(pred, aliases))
            return
        pairs = [
            (c, j)
            for c in range(owners[0], owners[-1] + 1)
            for j in range(len(rows[0]))
            if any(row[j] for row, o in zip(rows, owners, strict=True) if o == c)
        ]
        for n, (c, j) in enumerate(pairs):
            weights = [row[j] if o == c else 0.0 for row, o in zip(rows, owners, strict=True)]
            go = torch.tensor(weights, dtype=pred.dtype)
            with torch.enable_grad():
                grads = runner.grads(pred, aliases, go, retain=n < len(pairs) - 1)
            sums.add(c, j, *grads)
            del grads

    def __repr__(self) -> str:
        return "Stream()"


@final
class _StreamSums:
    """The per-compound online-softmax state of the stream strategy."""

    def __init__(self, count: int, exact: torch.dtype, device: torch.device) -> None:
        self.count = count
        self.exact = exact
        self.running_max = torch.full((count,), float("-inf"), dtype=exact, device=device)
        self.total = torch.zeros(count, dtype=exact, device=device)
        self.center = torch.zeros(count, dtype=exact, device=device)
        # the same state as Python floats, for the CPU's host bookkeeping
        self.host_max = [-math.inf] * count
        self.host_total = [0.0] * count
        self.host_center = [0.0] * count
        self.on_host = False
        self.targets = GradTargets(ParamLayout(()))
        self.acc = torch.zeros(0)
        self.scratch = torch.zeros(0)
        self.views: dict[tuple[int, int], list[Tensor]] = {}
        self.pose_acc: dict[tuple[int, int], Tensor] = {}

    def allocate(self, targets: GradTargets) -> None:
        """Fix the targets (known once the first chunk's graph was walked)."""
        self.targets = targets

    @torch.no_grad()
    def update(
        self,
        combination: StreamingCombination,
        segments: Segments,
        start: int,
        y: Tensor,
        lo: int,
        hi: int,
        local: Tensor,
    ) -> Tensor:
        """Fold a chunk's predictions into the state; return its ``(b, k)`` weights."""
        # Compounds that start in this chunk (a contiguous range) take their first
        # prediction as centre; device-side indexing, so no host sync per chunk.
        first = lo if segments.starts[lo] >= start else lo + 1
        if first < hi:
            rows = segments.start_index[first:hi] - start
            self.center[first:hi] = y[rows]
        centers = self.center[lo:hi].clone()
        log_w, feats = combination.stream_terms(y, centers[local])
        self._allocate(feats.shape[-1])
        old = self.running_max[lo:hi].clone()
        chunk_max = segment_max(log_w, local, hi - lo)
        new = torch.maximum(old, chunk_max)
        scale = torch.where(torch.isinf(old), torch.zeros_like(old), torch.exp(old - new))
        w = torch.exp(log_w - new[local])
        self.total[lo:hi] = self.total[lo:hi] * scale + segment_sum(w, local, hi - lo)
        self.running_max[lo:hi] = new
        self.acc[lo:hi].mul_(scale.to(self.acc.dtype)[:, None, None])
        for (c, _), t in self.pose_acc.items():
            if lo <= c < hi:
                t.mul_(scale[c - lo].to(t.dtype))
        shift = getattr(combination, "stream_shift", None)
        if shift is not None:
            # Centre every compound on its best pose so far (no host sync: where the
            # best pose is not in this chunk the move is the identity).
            b = y.shape[0]
            position = torch.arange(b, device=y.device)
            best = torch.full((hi - lo,), b - 1, dtype=torch.long, device=y.device)
            best = best.scatter_reduce(
                0, local, torch.where(log_w == chunk_max[local], position, b - 1), reduce="amin"
            )
            moved = torch.where(chunk_max > old, y[best], centers)
            move = torch.vmap(shift)(centers, moved).to(self.exact)  # (n, k, k)
            self.acc[lo:hi] = torch.bmm(move.to(self.acc.dtype), self.acc[lo:hi])
            for (c, _), t in self.pose_acc.items():
                if lo <= c < hi:
                    t.copy_(torch.tensordot(move[c - lo].to(t.dtype), t, dims=1))
            feats = torch.bmm(move[local], feats.unsqueeze(-1)).squeeze(-1)
            self.center[lo:hi] = moved
        return w[:, None] * feats

    @torch.no_grad()
    def update_host(
        self, combination: StreamingCombination, segments: Segments, start: int, pred: Tensor
    ) -> list[list[float]]:
        """:meth:`update` on Python floats; return the chunk's weights, one row per pose."""
        self.on_host = True
        y = pred.to(self.exact)
        values = y.tolist()
        owners = segments.owner[start : start + len(values)]
        for c in range(owners[0], owners[-1] + 1):
            if start <= segments.starts[c]:
                self.host_center[c] = values[segments.starts[c] - start]
        centers = torch.tensor([self.host_center[o] for o in owners], dtype=self.exact)
        log_w, feats = combination.stream_terms(y, centers)
        self._allocate(feats.shape[-1])
        logs, phis = log_w.tolist(), feats.tolist()
        shift = getattr(combination, "stream_shift", None)
        rows: list[list[float]] = []
        for c in range(owners[0], owners[-1] + 1):
            mine = [i for i, o in enumerate(owners) if o == c]
            best = max(mine, key=lambda i: logs[i])
            old = self.host_max[c]
            new = max(old, logs[best])
            scale = math.exp(old - new) if old > -math.inf else 0.0
            if scale != 1.0:
                self._scale(c, scale)
            features = [phis[i] for i in mine]
            if shift is not None and logs[best] > old and values[best] != self.host_center[c]:
                # The best pose so far is in this chunk: centre the features on it.
                move = shift(
                    torch.tensor(self.host_center[c], dtype=self.exact),
                    torch.tensor(values[best], dtype=self.exact),
                ).to(self.exact)
                self._move(c, move)
                features = (torch.tensor(features, dtype=self.exact) @ move.T).tolist()
                self.host_center[c] = values[best]
            weights = [math.exp(logs[i] - new) for i in mine]
            self.host_total[c] = self.host_total[c] * scale + math.fsum(weights)
            self.host_max[c] = new
            rows += [[w * phi for phi in f] for w, f in zip(weights, features, strict=True)]
        return rows

    def _scale(self, c: int, scale: float | Tensor) -> None:
        """Multiply compound ``c``'s sums by ``scale`` (a new running maximum)."""
        self.acc[c].mul_(scale)
        for (owner, _), t in self.pose_acc.items():
            if owner == c:
                t.mul_(scale)

    def _move(self, c: int, move: Tensor) -> None:
        """Re-express compound ``c``'s sums for a new centre: ``A <- M A`` (k x k)."""
        self.acc[c] = move.to(self.acc.dtype) @ self.acc[c]
        for (owner, _), t in self.pose_acc.items():
            if owner == c:
                t.copy_(torch.tensordot(move.to(t.dtype), t, dims=1))

    def finish(self) -> None:
        """Bring the host bookkeeping into the tensors the backward reads."""
        if self.on_host:
            self.total = torch.tensor(self.host_total, dtype=self.exact)
            self.center = torch.tensor(self.host_center, dtype=self.exact)

    def _allocate(self, features: int) -> None:
        """Allocate the sums once ``k`` is known, before the first backward (flat peak)."""
        if self.acc.numel() == 0:
            layout = self.targets.layout
            self.acc = torch.zeros(
                (self.count, features, layout.numel), dtype=layout.dtype, device=layout.device
            )
            self.scratch = layout.new_buffer(1)[0]

    def add_pose_host(
        self, c: int, weights: list[float], params: Sequence[Tensor], pose: list[tuple[int, Tensor]]
    ) -> None:
        """Add one pose's unweighted gradients to the sums of compound ``c`` with nonzero weight."""
        if params:
            self.targets.layout.flatten_into(params, self.scratch)
        for j, w in enumerate(weights):
            if w != 0.0:
                self.acc[c, j].add_(self.scratch, alpha=w)
                self.add(c, j, (), [(slot, g * w) for slot, g in pose])

    def add_pose(
        self, c: int, weights: Tensor, params: Sequence[Tensor], pose: list[tuple[int, Tensor]]
    ) -> None:
        """Add one pose's unweighted gradients to all ``k`` sums of compound ``c``."""
        layout = self.targets.layout
        if params:
            layout.flatten_into(params, self.scratch)
        self.acc[c].addr_(weights.to(self.acc.dtype), self.scratch)
        for slot, g in pose:
            for j in range(self.acc.shape[1]):
                self.add(c, j, (), [(slot, g * weights[j].to(g.dtype))])

    def add(self, c: int, j: int, params: Sequence[Tensor], pose: list[tuple[int, Tensor]]) -> None:
        """Add one backward's gradients to compound ``c``'s ``j``-th sums."""
        if params:
            views = self.views.get((c, j))
            if views is None:
                views = self.views[c, j] = self.targets.layout.views(self.acc[c, j])
            torch._foreach_add_(views, list(params))
        for slot, g in pose:
            key = (c, slot)
            if key not in self.pose_acc:
                self.pose_acc[key] = g.new_zeros((self.acc.shape[1], *g.shape))
            self.pose_acc[key][j].add_(g)


def _host_scalars(device: torch.device) -> bool:
    """Whether stream may read scalars on the host per chunk (no sync cost)."""
    return device.type == "cpu"


def _scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for per-pose scalars, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@final
class _StreamedGradients(PoseGradients):
    supports_pose_losses = False
    strategy = "stream"

    def __init__(
        self, sums: _StreamSums, combination: StreamingCombination, used: set[int]
    ) -> None:
        super().__init__(sums.targets, used)
        self.sums = sums
        self.combination: StreamingCombination | None = combination
        self.coefficients: Tensor | None = None

    def contract(self, coeffs: Tensor) -> list[Tensor | None]:  # pragma: no cover - guarded
        raise StrategyError(
            "the 'stream' strategy keeps only running sums, so it cannot weight poses "
            "individually; use strategy='store' or strategy='recompute'"
        )

    @override
    def settle(self, combined: Tensor) -> None:
        # The coefficients lambda(G) with the combination as the forward used it: a
        # hyperparameter changed before backward (a schedule step) must not change them.
        sums = self.sums
        assert self.combination is not None, "settle is called once, by the forward"
        with torch.no_grad():
            self.coefficients = _coefficients(
                self.combination, combined.detach().to(sums.exact), sums.center
            ).to(sums.exact)
        self.combination = None

    def contract_combined(self, comb_grad: Tensor) -> list[Tensor | None]:
        sums = self.sums
        assert self.coefficients is not None, "settle runs in the forward, before any backward"
        coeffs = self.coefficients * (comb_grad.to(sums.exact) / sums.total)[:, None]
        acc = sums.acc
        flat = torch.mv(acc.reshape(-1, acc.shape[-1]).t(), coeffs.reshape(-1).to(acc.dtype))
        grads: list[Tensor | None] = list(self.layout.unflatten(flat))
        pose: list[Tensor | None] = [None] * len(self.targets.pose_inputs)
        for (c, slot), t in sums.pose_acc.items():
            g = torch.tensordot(coeffs[c].to(t.dtype), t, dims=1)
            prev = pose[slot]
            pose[slot] = g if prev is None else prev + g
        return grads + pose


def _coefficients(combination: StreamingCombination, combined: Tensor, center: Tensor) -> Tensor:
    """``stream_coefficients`` of every compound, shape ``(C, k)``."""
    try:
        return torch.vmap(combination.stream_coefficients)(combined, center)
    except Exception:  # a plugin whose coefficients vmap cannot map: one call per compound
        return torch.stack(
            [combination.stream_coefficients(g, c) for g, c in zip(combined, center, strict=True)]
        )


#: The strategies by name: the one list every other place (configs, the CLI) reads.
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Store, Recompute, Stream)}


def resolve_strategy(strategy: str | Strategy) -> Strategy:
    """Return a strategy instance for a name (``"store"``, ``"recompute"``, ``"stream"``)."""
    if isinstance(strategy, Strategy):
        return strategy
    key = str(strategy).strip().lower()
    if key not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)} "
            "or pass a combframe.core.strategies.Strategy instance"
        )
    return STRATEGIES[key]()
