"""Walking a chunk's autograd graph, and watching what the model does inside forward.

The runner walks the graph of the first chunk run with one to find every leaf the
predictions reach (parameters, stand-ins of pose tensors, tensors captured by a closure),
and every later graph to check it reaches nothing new.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: A leaf whose view is a new autograd node: the probe of :func:`_graph_mark`.
_PROBE = torch.empty(0, requires_grad=True)


def _graph_mark() -> int:
    """Return a sequence number below that of every autograd node created from now on."""
    with torch.enable_grad():
        node = _PROBE.view(0).grad_fn
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
