"""MultiPoseModel under DistributedDataParallel: 2 CPU processes, gloo, on loopback.

One spawn runs every scenario (a spawn costs seconds). In each, every rank checks that

* the forward fires no gradient reduction (per-pose gradients come from
  ``torch.autograd.grad``, which leaves ``.grad`` and DDP's hooks alone),
* each synchronised backward performs exactly one all-reduce (the small model fits one
  bucket), a backward under ``no_sync()`` none,
* afterwards its gradients equal, in float64, those of one process computing the mean
  loss over all ranks' compounds with the full-graph reference.

Workers raise on a mismatch; ``torch.multiprocessing.spawn`` re-raises in the test.
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations.
import copy
import gc
import os
import socket
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import combframe
from combframe.testing import make_loss
from tests.conftest import make_mlp, make_poses

WORLD = 2
COMPOUNDS_PER_RANK = 2
#: (strategy, loss kind, model, chunk size): stream supports losses on the combined
#: prediction only; "partial" has a frozen layer and a parameter no pose uses, under DDP's
#: default ``find_unused_parameters=False``. With a chunk size, each rank's compounds go
#: through one ``ddp(compounds=...)`` call in chunks spanning compounds.
SCENARIOS: list[tuple[str, str, str, int | None]] = [
    ("store", "both", "mlp", None),
    ("recompute", "both", "mlp", None),
    ("recompute", "per_pose", "mlp", None),
    ("stream", "combined", "mlp", None),
    ("store", "both", "partial", None),
    ("recompute", "combined", "partial", None),
    ("recompute", "both", "mlp", 3),
    ("stream", "combined", "partial", 4),
    ("store", "both", "mlp", 2),
]


class _Partial(torch.nn.Module):
    """An MLP behind a frozen layer, plus a parameter that no pose uses."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(5, 5).double().requires_grad_(False)
        self.mlp = make_mlp(seed=5)
        self.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(torch.tanh(self.frozen(x)))


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(4)
    return make_mlp(seed=4) if name == "mlp" else _Partial()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _compounds(rank: int, step: int) -> list[list[Tensor]]:
    """Rank ``rank``'s compounds for micro-batch ``step``: different N on every rank."""
    return [
        make_poses(2 + rank + 3 * c, seed=100 * step + 10 * rank + c)
        for c in range(COMPOUNDS_PER_RANK)
    ]


def _combination() -> combframe.Combination:
    return combframe.create_combination("max", negate_preds=True, pred_scale=3.0)


def _reference_grads(base: torch.nn.Module, kind: str, steps: int) -> list[Tensor]:
    """One process: full graph, mean loss over all ranks' compounds, summed over steps."""
    model = copy.deepcopy(base)
    loss_fn = make_loss(kind)  # type: ignore[arg-type]
    comb = _combination()
    for step in range(steps):
        everything = [c for r in range(WORLD) for c in _compounds(r, step)]
        total = torch.zeros((), dtype=torch.float64)
        for poses in everything:
            per_pose = torch.stack([model(p).reshape(()) for p in poses])
            total = total + loss_fn(comb.value(per_pose), per_pose)
        (total / len(everything)).backward()
    # DDP writes zeros for a parameter no pose uses, where the full graph leaves None.
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
        if p.requires_grad
    ]


class _Counter:
    def __init__(self) -> None:
        self.calls = 0


def _counting_allreduce(state: _Counter, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    state.calls += 1
    tensor = bucket.buffer().div_(dist.get_world_size())
    fut = dist.all_reduce(tensor, async_op=True).get_future()  # type: ignore[union-attr]
    return fut.then(lambda f: f.value()[0])


def _step(
    ddp: DistributedDataParallel,
    rank: int,
    step: int,
    kind: str,
    counter: _Counter,
    device: torch.device,
    batched: bool = False,
) -> None:
    loss_fn = make_loss(kind)  # type: ignore[arg-type]
    losses = []
    compounds = [[p.to(device) for p in poses] for poses in _compounds(rank, step)]
    if batched:
        out = ddp(compounds=compounds)
        per_compound = out.per_pose.split([len(c) for c in compounds])
        losses = [loss_fn(g, y) for g, y in zip(out.combined, per_compound, strict=True)]
    for poses in [] if batched else compounds:
        combined, per_pose = ddp(poses)
        losses.append(loss_fn(combined, per_pose))
    assert counter.calls == 0, f"the forward ran {counter.calls} all-reduces; expected none"
    torch.stack(losses).mean().backward()


def _check(got: list[Tensor], want: list[Tensor], what: str) -> None:
    for i, (g, w) in enumerate(zip([g.cpu() for g in got], want, strict=True)):
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item()
        assert err <= 1e-12, f"{what}: parameter {i} differs by {err:.3e} relative"


def _worker(rank: int, port: int, backend: str = "gloo") -> None:
    """One rank: ``gloo`` on CPU, or ``nccl`` with rank ``r`` on ``cuda:r``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":  # gloo binds to loopback, not to the host's first interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        for strategy, kind, model, chunk in SCENARIOS:
            _scenario(rank, strategy, kind, model, device, chunk)
            # Free each DDP reducer (and its comm-hook future callbacks) while the
            # process group is alive; one collected at interpreter exit can abort the
            # process ("terminate called without an active exception").
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _scenario(
    rank: int, strategy: str, kind: str, model: str, device: torch.device, chunk: int | None
) -> None:
    base = _model(model)
    what = f"rank {rank}, {strategy}/{kind}/{model}/chunk={chunk}"
    multi = combframe.MultiPoseModel(
        copy.deepcopy(base).to(device), _combination(), strategy=strategy, chunk_size=chunk or 1
    )
    batched = chunk is not None
    counter = _Counter()
    ids = None if device.type == "cpu" else [device.index]
    ddp = DistributedDataParallel(multi, device_ids=ids, bucket_cap_mb=100)
    ddp.register_comm_hook(counter, _counting_allreduce)  # type: ignore[arg-type]
    params = [p for p in multi.model.parameters() if p.requires_grad]

    # One synchronised step.
    _step(ddp, rank, 0, kind, counter, device, batched)
    assert counter.calls == 1, f"{what}: {counter.calls} all-reduces in one backward"
    _check([p.grad for p in params], _reference_grads(base, kind, 1), f"{what}, one step")  # type: ignore[misc]

    # Accumulate two micro-batches: the first under no_sync (no communication).
    ddp.zero_grad(set_to_none=True)
    counter.calls = 0
    with ddp.no_sync():
        _step(ddp, rank, 0, kind, counter, device, batched)
    assert counter.calls == 0, f"{what}: no_sync backward ran {counter.calls} all-reduces"
    _step(ddp, rank, 1, kind, counter, device, batched)
    assert counter.calls == 1, f"{what}: {counter.calls} all-reduces after no_sync"
    _check([p.grad for p in params], _reference_grads(base, kind, 2), f"{what}, no_sync")  # type: ignore[misc]

    # Every rank holds the same gradients (bit for bit).
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], g) for g in gathered), f"{what}: ranks disagree"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_gloo_two_processes() -> None:
    args: Any = (_free_port(),)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
