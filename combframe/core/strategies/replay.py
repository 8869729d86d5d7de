"""Snapshots of the state a forward changes, and its replay: buffers, RNG, autocast.

The one home of every snapshot the strategies and the wrapper take:

- :class:`BufferSnapshot`: the buffers' version counters (and values, in training mode),
  to tell which a forward wrote and to put them back after a failed one;
- :class:`BufferLog`: the buffer values each chunk's forward started from (recompute);
- :class:`RngState` and :class:`AutocastState`: what a re-run needs to draw the same
  random numbers and cast as the forward did (the CPU's autocast and the device's, as
  ``torch.utils.checkpoint`` captures them);
- :func:`undo_side_effects` and :func:`stand_in_buffers`: run a pass whose buffer
  writes and RNG draws leave no trace on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import Tensor

Modules = Sequence[torch.nn.Module]


def version(tensor: Tensor) -> int:
    """Return a tensor's version counter, moved by every in-place write.

    An inference tensor (made under ``torch.inference_mode``, a model built there) keeps
    none: -1, so that its writes are seen by value only.
    """
    return -1 if tensor.is_inference() else int(tensor._version)


def module_buffers(modules: Modules) -> list[Tensor]:
    """Every buffer of ``modules`` (the model and a readout module)."""
    return [b for m in modules for b in m.buffers()]


def training(modules: Modules) -> bool:
    """Whether any module (or submodule) is in training mode."""
    return any(m.training for top in modules for m in top.modules())


@final
class BufferSnapshot:
    """The buffers' version counters, and their values when ``by_value``.

    A moved version counter says a buffer was written; with the values kept, a buffer
    whose value differs counts too (batch norm updates its running statistics without
    moving their version counters in training mode), compared with one host sync.
    """

    def __init__(self, buffers: Sequence[Tensor], by_value: bool) -> None:
        self.buffers = list(buffers)
        self.versions = [version(b) for b in self.buffers]
        self.values: dict[int, Tensor] | None = (
            {k: b.clone() for k, b in enumerate(self.buffers)} if by_value else None
        )

    @classmethod
    def of(cls, modules: Modules) -> BufferSnapshot:
        """Snapshot the buffers of ``modules``, by value when one of them trains."""
        return cls(module_buffers(modules), by_value=training(modules))

    def changed(self, only: Sequence[int] | None = None) -> set[int]:
        """Return the indices of the buffers written since the snapshot (among ``only``)."""
        keys = range(len(self.buffers)) if only is None else only
        moved = {k for k in keys if version(self.buffers[k]) != self.versions[k]}
        rest = [k for k in keys if k not in moved and self.values is not None]
        if rest and self.values is not None:
            values = self.values
            differs = torch.stack([(self.buffers[k] != values[k]).any() for k in rest]).tolist()
            moved.update(k for k, d in zip(rest, differs, strict=True) if d)
        return moved

    def restore(self) -> None:
        """Put back the buffers written since; the others are not touched.

        Writing a buffer that did not change would move its version counter and break
        any other live graph that saved it. A no-op without values.
        """
        values = self.values
        changed = sorted(self.changed()) if values is not None else []
        if values is not None and changed:
            with torch.no_grad():
                torch._foreach_copy_(
                    [self.buffers[k] for k in changed], [values[k] for k in changed]
                )


@final
class BufferLog:
    """The buffer values each chunk's forward started from, for the buffers that change.

    The forward of a model in training mode updates some buffers in place (batch-norm
    statistics); a re-run of chunk ``k`` must start from their values before chunk
    ``k``. Before the first chunk every buffer is copied once; afterwards only those
    that changed are copied per chunk, and at the end the copies of buffers that never
    changed are dropped, so a constant buffer costs nothing per chunk. A re-run uses
    fresh stand-ins (:func:`stand_in_buffers`): the model's own buffers are never
    written back. ``by_value``: compare values too after the first chunk (training
    mode, where batch norm writes without moving version counters).
    """

    def __init__(self, buffers: list[Tensor], by_value: bool = True) -> None:
        self.buffers = buffers
        self.by_value = by_value
        self.snapshot = BufferSnapshot(buffers, by_value=True)
        self.changed: set[int] = set()
        self.chunks: list[dict[int, Tensor]] = []

    def start_chunk(self) -> None:
        """Copy the buffers changed so far (the others still hold their first value)."""
        self.chunks.append({k: self.buffers[k].clone() for k in sorted(self.changed)})

    def end_chunk(self) -> None:
        """Note the buffers the chunk changed (by value after the first chunk only)."""
        snapshot = self.snapshot
        if len(self.chunks) == 1 and self.by_value:
            self.changed |= snapshot.changed()
        else:
            self.changed |= {
                k for k, b in enumerate(self.buffers) if version(b) != snapshot.versions[k]
            }

    def finish(self) -> None:
        """Drop the first values of the buffers no chunk changed."""
        values = self.snapshot.values or {}
        self.snapshot.values = {k: t for k, t in values.items() if k in self.changed}

    def before(self, k: int) -> dict[int, Tensor]:
        """Fresh stand-ins holding chunk ``k``'s starting values, by id of the buffer."""
        start, first = self.chunks[k], self.snapshot.values or {}
        return {id(self.buffers[j]): start.get(j, first[j]).clone() for j in self.changed}


def buffer_copies(model: torch.nn.Module) -> dict[str, Tensor]:
    """Return fresh copies of ``model``'s buffers by name, for a pass that must not write them."""
    return {name: b.clone() for name, b in model.named_buffers()}


@contextlib.contextmanager
def stand_in_buffers(modules: Modules, values: dict[int, Tensor]) -> Iterator[None]:
    """Run the body with the buffers whose ids are keys of ``values`` replaced by them.

    The modules hold the stand-ins only for the duration: whatever the body writes into
    a buffer lands in its stand-in, and the module's own tensor keeps its value and its
    version counter.
    """
    swapped: list[tuple[torch.nn.Module, str, Tensor]] = []
    if values:
        for top in modules:
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


@contextlib.contextmanager
def undo_side_effects(modules: Modules, device: torch.device) -> Iterator[None]:
    """Run a look-ahead pass whose RNG draws and buffer updates leave no trace.

    The pass runs on copies of the buffers, so the model's own buffers are never written
    (their version counters do not move, and a graph built earlier that saved one stays
    valid).
    """
    copies = {id(b): b.clone() for b in module_buffers(modules)}
    devices = [device] if device.type != "cpu" else []
    with (
        stand_in_buffers(modules, copies),
        torch.random.fork_rng(devices=devices, device_type=device.type),
    ):
        yield


def _device_rng_module(device: torch.device) -> Any:
    return None if device.type == "cpu" else getattr(torch, device.type, None)


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and the model device's."""

    cpu: Tensor
    device: Tensor | None

    @classmethod
    def capture(cls, device: torch.device, previous: RngState | None = None) -> RngState:
        """Capture the state; return ``previous`` itself if nothing drew since.

        Sharing unchanged states keeps recompute's memory flat in N for models without
        randomness (a CPU generator state is about 5 kB per pose otherwise).
        """
        mod = _device_rng_module(device)
        state = cls(torch.get_rng_state(), None if mod is None else mod.get_rng_state(device))
        if previous is not None and state.same(previous):
            return previous
        return state

    def same(self, other: RngState) -> bool:
        """Whether both states are equal."""
        if not torch.equal(self.cpu, other.cpu):
            return False
        if self.device is None or other.device is None:
            return self.device is other.device
        return torch.equal(self.device, other.device)

    @contextlib.contextmanager
    def replay(self, device: torch.device) -> Iterator[None]:
        """Run the body with the RNG as it was; leave the global RNG untouched after."""
        devices = [] if self.device is None else [device]
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                _device_rng_module(device).set_rng_state(self.device, device)
            yield


@dataclass(frozen=True)
class AutocastState:
    """Autocast as the forward ran: the CPU's and the model device's (as checkpoint does)."""

    states: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, device_type: str) -> AutocastState:
        """Capture the CPU's autocast state and, for another device, that device's too."""
        types = dict.fromkeys(("cpu", device_type))
        return cls(
            tuple(
                (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                for t in types
                if torch.amp.is_autocast_available(t)
            )
        )

    @contextlib.contextmanager
    def restore(self) -> Iterator[None]:
        """Run the body under the captured autocast states."""
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.states:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield
