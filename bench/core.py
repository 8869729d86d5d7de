"""The core's speed against the batched full graph: ``python bench/core.py [--quick]``.

Three measurements, each a ratio to the batched full graph (every pose of every compound
in one collated forward, one backward) or a time per call, on the CPU with one thread,
the median of interleaved repeats (the methods of a case run in a shuffled order per
repeat, in one process):

* ``compounds``: one chunk of 64 poses holding 64 compounds x 1 pose, 32 x 2, 8 x 8 or
  1 x 64, for ``stream``, ``recompute`` and ``store``;
* ``store``: store with ``chunk_size > 1`` on a model ``torch.func.vmap`` can map
  (64 poses, chunks of 16), with the model's forward calls per step after the first;
* ``overhead``: the Python bookkeeping per pose and per chunk, from a model that does
  nothing (one parameter times the pose); ``--suite overhead`` measures it alone, for
  tensor poses, dicts of four tensors of which one requires grad, and PyG data whose
  positions require grad (the poses are rebuilt around stand-ins);
* ``auto`` (``--suite auto``): every strategy and ``strategy="auto"`` (for a loss on the
  per-pose predictions too, and ``Auto(losses="combined")``) at one pose per pass and
  with chunks of 16, with what auto chose.

It uses the public API only, so the same command measures any checkout (set
``PYTHONPATH``). Results go to stdout as a Markdown table and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _graph import GraphModel, graph_collate, make_graph_poses
from _models import MODELS
from _timing import cpu, interleaved, wall
from torch import Tensor, nn

import combframe

Step = Callable[[], object]
#: How a step is timed: wall clock, or CPU time of the thread (``--clock cpu``).
CLOCKS = {"wall": wall, "cpu": cpu}
_clock = [wall]
MIXES = ((64, 1), (32, 2), (8, 8), (1, 64))


def _loss(combined: Tensor) -> Tensor:
    return ((combined + 9.0) ** 2).sum()


def _workloads() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], list[Any]], Any]]:
    return {
        "pointcloud": (
            lambda: MODELS["pointcloud"].build(0),
            lambda n: MODELS["pointcloud"].poses(n, torch.device("cpu"), atoms=32),
            None,
        ),
        "graph": (lambda: GraphModel(), lambda n: make_graph_poses(n, 12), graph_collate),
    }


def _steps(
    model: nn.Module,
    compounds: list[list[Any]],
    collate: Any,
    chunk: int,
    strategies: tuple[str, ...],
) -> dict[str, Step]:
    """One training step per method: zero grads, forward, loss, backward."""
    combination = combframe.create_combination("boltzmann")
    flat = [p for c in compounds for p in c]
    index = torch.repeat_interleave(torch.arange(len(compounds)), len(compounds[0]))
    batch = (collate or combframe.default_collate)(flat)

    def batched() -> None:
        model.zero_grad(set_to_none=True)
        preds = model(batch).reshape(-1)
        _loss(combination.segment_value(preds, index, len(compounds))).backward()

    steps: dict[str, Step] = {"batched": batched}
    for strategy in strategies:
        chosen = combframe.Auto(losses="combined") if strategy == "auto-combined" else strategy
        wrapped = combframe.MultiPoseModel(
            model,
            combination,
            strategy=chosen,
            chunk_size=chunk,
            collate=collate if chunk > 1 else None,  # one pose per pass: the model's own call
        )

        def step(wrapped: combframe.MultiPoseModel = wrapped) -> None:
            model.zero_grad(set_to_none=True)
            _loss(wrapped(compounds=compounds).combined).backward()

        steps[strategy] = step
        step.wrapped = wrapped  # type: ignore[attr-defined]  # read by auto_suite
    return steps


def _interleaved(steps: dict[str, Step], reps: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per step of each method, run in a shuffled order per repeat."""
    for step in steps.values():  # warm up (and let store decide its path)
        step()
    times = interleaved(steps, reps, random.Random(seed), timer=_clock[0])
    return {name: statistics.median(t) for name, t in times.items()}


def compounds_suite(reps: int) -> list[dict[str, Any]]:
    """Ratios to the batched full graph of one 64-pose chunk of many compounds."""
    rows = []
    for key, (build, poses, collate) in _workloads().items():
        for count, per in MIXES:
            model = build()
            flat = poses(count * per)
            compounds = [flat[i * per : (i + 1) * per] for i in range(count)]
            strategies = ("stream", "recompute", "store")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", combframe.StrategyWarning)
                med = _interleaved(_steps(model, compounds, collate, 64, strategies), reps)
            base = med["batched"]
            rows.append(
                {"model": key, "compounds": count, "poses": per, "batched_ms": 1e3 * base}
                | {s: med[s] / base for s in strategies}
            )
    return rows


def store_suite(reps: int) -> dict[str, Any]:
    """Store with chunks of 16 on a vmappable model: ratio, and forward calls per step."""
    build, poses, _ = _workloads()["pointcloud"]
    model = build()
    steps = _steps(model, [poses(64)], None, 16, ("store", "recompute", "stream"))
    med = _interleaved(steps, reps)
    calls: list[object] = []  # one entry per forward call of the model
    hook = model.register_forward_pre_hook(lambda *_: calls.append(None))
    # A hook is part of the model's structure: the first step with it decides again
    # (its extra forwards are not counted), the second is a step like any other.
    steps["store"]()
    calls.clear()
    steps["store"]()
    hook.remove()
    return {
        "forwards_per_step": len(calls),
        "chunks": 4,
        **{s: med[s] / med["batched"] for s in ("store", "recompute", "stream")},
    }


AUTO_CASES = (  # model, compounds, poses per compound, chunk size
    ("pointcloud", 1, 16, 1),
    ("graph", 1, 16, 1),
    ("pointcloud", 8, 8, 16),
    ("graph", 8, 8, 16),
)


def auto_suite(reps: int) -> list[dict[str, Any]]:
    """Every strategy and auto, one pose per pass and in chunks: ratios and auto's choice."""
    names = ("store", "recompute", "stream", "auto", "auto-combined")
    rows = []
    for key, count, per, chunk in AUTO_CASES:
        build, poses, collate = _workloads()[key]
        flat = poses(count * per)
        compounds = [flat[i * per : (i + 1) * per] for i in range(count)]
        steps = _steps(build(), compounds, collate, chunk, names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", combframe.StrategyWarning)
            med = _interleaved(steps, reps)
        chose = {n: steps[n].wrapped.strategy.chosen.name for n in names[3:]}  # type: ignore[attr-defined]  # set by _steps
        row = {"model": key, "compounds": count, "poses": per, "chunk": chunk}
        rows.append(row | {"batched_ms": 1e3 * med["batched"]} | chose_ratio(med, names, chose))
    return rows


def chose_ratio(
    med: dict[str, float], names: tuple[str, ...], chose: dict[str, str]
) -> dict[str, Any]:
    """Each method's ratio to the batched graph, and what auto chose."""
    return {n: med[n] / med["batched"] for n in names} | {f"{n}_chose": c for n, c in chose.items()}


class _Nothing(nn.Module):
    """One parameter times the pose: a model whose cost is combframe's bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: Any) -> Tensor:
        if isinstance(x, dict):  # x and a pose tensor that requires grad, among others
            return (self.w * x["x"] + x["q"]).sum(-1)
        if not isinstance(x, Tensor):  # a PyG batch: one sum per graph
            per_atom = (self.w * x.x + x.pos).sum(-1)
            return torch.zeros(x.num_graphs).index_add(0, x.batch, per_atom)
        return (self.w * x).sum(-1)


def _overhead_poses(kind: str, m: int) -> list[Any]:
    """``m`` one-number poses: a tensor, a dict of four tensors (one requiring grad), or
    PyG data whose positions require grad."""
    if kind == "tensor":
        return [torch.full((1,), float(i)) for i in range(m)]
    if kind == "dict":
        return [
            {
                "x": torch.full((1,), float(i)),
                "q": torch.zeros(1, requires_grad=True),
                "z": torch.ones(1, dtype=torch.long),
                "mask": torch.ones(1, dtype=torch.bool),
            }
            for i in range(m)
        ]
    from torch_geometric.data import Data

    return [
        Data(x=torch.full((1, 1), float(i)), pos=torch.zeros(1, 1, requires_grad=True))
        for i in range(m)
    ]


def overhead_suite(
    reps: int, m: int = 256, kinds: tuple[str, ...] = ("tensor",)
) -> dict[str, dict[str, float]]:
    """Microseconds of bookkeeping per pose and per chunk, with a model that does nothing.

    Keys are ``strategy`` for tensor poses and ``strategy/kind`` for the other ``kinds``.
    """
    out: dict[str, dict[str, float]] = {}
    for kind in kinds:
        poses = _overhead_poses(kind, m)
        for strategy in ("store", "recompute", "stream"):
            model = _Nothing()
            steps = {}
            for chunk, n in ((1, m), (m, m), (m, m // 4)):
                wrapped = combframe.MultiPoseModel(
                    model, "boltzmann", strategy=strategy, chunk_size=chunk
                )

                def step(wrapped: combframe.MultiPoseModel = wrapped, few: Any = poses[:n]) -> None:
                    wrapped.zero_grad(set_to_none=True)
                    _loss(wrapped(few)[0]).backward()

                steps[f"{chunk}/{n}"] = step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", combframe.StrategyWarning)
                med = _interleaved(steps, reps)
            one, full, quarter = med[f"1/{m}"], med[f"{m}/{m}"], med[f"{m}/{m // 4}"]
            out[strategy if kind == "tensor" else f"{strategy}/{kind}"] = {
                "per_pose_us": 1e6 * (full - quarter) / (m - m // 4),
                "per_chunk_us": 1e6 * (one - full) / (m - 1),
            }
    return out


def _report_overhead(overhead: dict[str, dict[str, float]]) -> None:
    print("\n| strategy | per pose (us) | per chunk (us) |\n|---|---|---|")
    for s, o in overhead.items():
        print(f"| {s} | {o['per_pose_us']:.1f} | {o['per_chunk_us']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--suite", choices=("core", "auto", "overhead"), default="core")
    parser.add_argument("--reps", type=int, help="interleaved repeats (default 7)")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="time steps by wall or CPU time"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = args.reps or (3 if args.quick else 7)
    _clock[0] = CLOCKS[args.clock]
    if args.suite == "auto":
        _report_auto(auto_suite(reps), args.json)
        return
    if args.suite == "overhead":
        overhead = overhead_suite(reps, kinds=("tensor", "dict", "pyg"))
        _report_overhead(overhead)
        if args.json:
            args.json.write_text(json.dumps({"torch": torch.__version__, "overhead": overhead}))
        return
    results = {
        "torch": torch.__version__,
        "reps": reps,
        "clock": args.clock,
        "compounds": compounds_suite(reps),
        "store": store_suite(reps),
        "overhead": overhead_suite(reps),
    }
    print("| model | compounds x poses | batched (ms) | stream | recompute | store |")
    print("|---|---|---|---|---|---|")
    for r in results["compounds"]:
        print(
            f"| {r['model']} | {r['compounds']} x {r['poses']} | {r['batched_ms']:.1f} | "
            f"{r['stream']:.2f}x | {r['recompute']:.2f}x | {r['store']:.2f}x |"
        )
    print("\nstore, chunks of 16 (pointcloud, 64 poses):", json.dumps(results["store"]))
    _report_overhead(results["overhead"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.flush()


def _report_auto(rows: list[dict[str, Any]], out: Path | None) -> None:
    print(
        "| model | compounds x poses | chunk | batched (ms) | store | recompute | stream "
        "| auto | auto (combined) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['compounds']} x {r['poses']} | {r['chunk']} | "
            f"{r['batched_ms']:.1f} | {r['store']:.2f}x | {r['recompute']:.2f}x | "
            f"{r['stream']:.2f}x | {r['auto']:.2f}x ({r['auto_chose']}) | "
            f"{r['auto-combined']:.2f}x ({r['auto-combined_chose']}) |"
        )
    if out:
        out.write_text(json.dumps({"torch": torch.__version__, "auto": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
