"""``combframe train`` under ``torchrun``: ranks, sharding and collectives.

``torchrun --nproc-per-node=K -m combframe train ...`` starts K processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each takes every K-th compound of each
batch and of the evaluation sets, the model is wrapped in ``DistributedDataParallel``
(gloo on CPU, NCCL on CUDA) and the metrics are reduced over the ranks, so every rank
computes the same numbers as one process would; only rank 0 writes and prints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from combframe.app.torchrun import environment_ranks

__all__ = ["Ranks", "from_environment", "process_group"]

T = TypeVar("T")


@dataclass
class Ranks:
    """A process's place among the training processes (one process: rank 0 of 1).

    Attributes
    ----------
    rank, world, local_rank
        From ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``).
    device
        Where collective operations keep their tensors (CUDA for NCCL).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """Whether there is more than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes and prints."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """Return this rank's share of ``items``: every ``world``-th item from ``rank`` on."""
        return list(items[self.rank :: self.world])

    def _reduce(self, value: float, op: Any) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def sum(self, value: float) -> float:
        """Return the sum of ``value`` over the ranks."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        """Return the largest ``value`` of the ranks."""
        return self._reduce(value, dist.ReduceOp.MAX)

    def gather(self, values: Tensor) -> Tensor:
        """Undo :meth:`shard`: every rank's ``values`` (rows of several targets) in order."""
        if not self.active:
            return values
        parts: list[list[float]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, values.double().cpu().tolist())
        order = [parts[i % self.world][i // self.world] for i in range(sum(map(len, parts)))]
        return torch.tensor(order, dtype=torch.float64)

    def broadcast(self, obj: T) -> T:
        """Return rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0)
        result: T = box[0]
        return result


def from_environment() -> Ranks:
    """Return the ranks ``torchrun`` set in the environment; rank 0 of 1 without it."""
    rank, world, local_rank = environment_ranks()
    return Ranks(rank=rank, world=world, local_rank=local_rank)


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Ranks]:
    """Join the process group for training on ``device`` (a no-op for one process).

    NCCL when ``device`` is CUDA, gloo otherwise; the group is left on exit.
    """
    if not ranks.active:
        yield ranks
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        yield Ranks(ranks.rank, ranks.world, ranks.local_rank, device)
        # Leave together: rank 0 hosts torchrun's store, and a rank still talking to it
        # when rank 0 exits aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()
