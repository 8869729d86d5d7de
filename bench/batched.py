"""Batched execution against the batched full graph (``python bench/run.py --suite batched``).

The speed reference is what a user with enough memory writes: all poses of the compound
in one forward (one collated batch) and one backward, every graph kept (``batched``).
Beside it, in the same process and interleaved in a shuffled order per repetition:

* ``per-pose``: the full graph, one pose per model call (all graphs kept),
* ``store``, ``recompute``, ``stream``: :class:`combframe.MultiPoseModel` running the poses
  ``chunk`` at a time.

Two small-pose models: ``graph`` (message passing along the edges to each atom's 8
nearest neighbours, variable atom counts, per-graph sum over a batch vector; plain torch,
collated by concatenating atoms) and ``pointcloud`` (model (a) of the per-pose suite,
poses of one size, stacked by the default collate). Peak memory is the peak of live tensor
bytes during one step above what was live before it: the torch profiler's allocation
events on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _graph import GraphModel, graph_collate, make_graph_poses
from _models import MODELS
from _timing import interleaved
from torch import Tensor, nn

import combframe
from combframe.testing import peak_tensor_bytes

__all__ = ["ratio_header", "ratio_row", "run_suite", "targets", "write_report"]

METHODS = ("batched", "per-pose", "store", "recompute", "stream")
STRATEGIES = ("store", "recompute", "stream")
TARGET = {"atoms": 32, "n": 64, "chunk": 16}
Step = Callable[[], object]


@dataclass(frozen=True)
class Workload:
    """A model, its poses and how they are batched."""

    key: str
    label: str
    build: Callable[[], nn.Module]
    poses: Callable[[int, int, torch.device], list[Any]]
    collate: Callable[[list[Any]], Any] | None


def _pointcloud_poses(n: int, atoms: int, device: torch.device) -> list[Any]:
    return MODELS["pointcloud"].poses(n, device, atoms=atoms)


WORKLOADS = {
    "graph": Workload(
        "graph",
        "graph model: 3 message-passing layers (width 64), 8 neighbours, variable atom counts",
        lambda: GraphModel(),
        lambda n, atoms, device: make_graph_poses(n, atoms, device),
        graph_collate,
    ),
    "pointcloud": Workload(
        "pointcloud",
        "point-cloud MLP (model (a)), 64 features per atom, poses stacked",
        lambda: MODELS["pointcloud"].build(0),
        _pointcloud_poses,
        None,
    ),
}


def make_steps(
    work: Workload,
    model: nn.Module,
    poses: list[Any],
    combination: combframe.Combination,
    chunk: int,
) -> dict[str, Step]:
    """One training step per method: zero grads, forward, loss on the combined value, backward."""
    collate = work.collate or combframe.default_collate

    def loss(combined: Tensor) -> Tensor:
        return (combined + 9.0) ** 2

    def batched() -> None:
        model.zero_grad(set_to_none=True)
        loss(combination.value(model(collate(poses)).reshape(-1))).backward()

    def per_pose() -> None:
        model.zero_grad(set_to_none=True)
        preds = torch.cat([model(collate([p])).reshape(-1) for p in poses])
        loss(combination.value(preds)).backward()

    steps: dict[str, Step] = {"batched": batched, "per-pose": per_pose}
    for strategy in STRATEGIES:
        wrapped = combframe.MultiPoseModel(
            model, combination, strategy=strategy, chunk_size=chunk, collate=work.collate
        )

        def step(wrapped: combframe.MultiPoseModel = wrapped) -> None:
            model.zero_grad(set_to_none=True)
            loss(wrapped(poses)[0]).backward()

        steps[strategy] = step
    return steps


def check_agreement(steps: dict[str, Step], model: nn.Module) -> float:
    """Worst relative gradient difference of every method to ``batched`` (float32)."""
    grads = {}
    for name, step in steps.items():
        step()
        grads[name] = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
    worst = 0.0
    for got in grads.values():
        for g, w in zip(got, grads["batched"], strict=True):
            worst = max(worst, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30))
    if worst > 1e-3:
        raise SystemExit(f"methods disagree with the batched reference: {worst:.2e}")
    return worst


def peak_bytes(step: Step, device: torch.device) -> int:
    """Peak live tensor bytes of one step above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return peak_tensor_bytes(step)


def run_case(
    work: Workload,
    atoms: int,
    n: int,
    chunk: int,
    combination: combframe.Combination,
    timer: Callable[[Step], float],
    device: torch.device,
    reps: int,
    seed: int,
) -> dict[str, Any]:
    """Times (every repetition) and peak memory of each method for one case."""
    model = work.build().to(device)
    poses = work.poses(n, atoms, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)  # store may go pose by pose
        steps = make_steps(work, model, poses, combination, chunk)
        agreement = check_agreement(steps, model)
        memory = {m: peak_bytes(steps[m], device) for m in METHODS}
        times = interleaved({m: steps[m] for m in METHODS}, reps, random.Random(seed), timer)
    return {"atoms": atoms, "n": n, "chunk": chunk, "time": times, "memory": memory,
            "agreement": agreement}  # fmt: skip


def grid(quick: bool) -> list[tuple[str, int, int, int]]:
    """(workload, atoms, N, chunk) of every case."""
    cases: list[tuple[str, int, int, int]] = []
    ns = (8, 64) if quick else (8, 16, 32, 64, 128)
    chunks = (1, 16, 64) if quick else (1, 4, 16, 64)
    for key in WORKLOADS:
        for n in ns:
            cases.append((key, 32, n, min(TARGET["chunk"], n)))
        for chunk in chunks:
            if chunk != TARGET["chunk"]:
                cases.append((key, 32, TARGET["n"], chunk))
        for n in (8,) if quick else (8, 32, 64):
            cases.append((key, 256, n, min(TARGET["chunk"], n)))
    return cases


def run_suite(
    combination_name: str,
    extra: Sequence[str],
    timer: Callable[[Step], float],
    device: torch.device,
    reps: int,
    quick: bool,
) -> dict[str, Any]:
    """Every case of :func:`grid` with ``combination_name``; the target case with ``extra``."""
    out: dict[str, Any] = {"combination": combination_name, "cases": [], "extra": []}
    comb = combframe.create_combination(combination_name)
    for k, (key, atoms, n, chunk) in enumerate(grid(quick)):
        res = run_case(WORKLOADS[key], atoms, n, chunk, comb, timer, device, reps, seed=k)
        res["workload"] = key
        out["cases"].append(res)
        print(_line(res), flush=True)
    for name in extra:
        comb = combframe.create_combination(name)
        for key in WORKLOADS:
            res = run_case(
                WORKLOADS[key], TARGET["atoms"], TARGET["n"], TARGET["chunk"], comb, timer,
                device, reps, seed=99,
            )  # fmt: skip
            res["workload"], res["combination"] = key, name
            out["extra"].append(res)
            print(f"[{name}] " + _line(res), flush=True)
    return out


def _med(v: Sequence[float]) -> float:
    return statistics.median(v)


def _line(res: dict[str, Any]) -> str:
    ref = _med(res["time"]["batched"])
    parts = [f"{m} {_med(res['time'][m]) / ref:.2f}x" for m in METHODS[1:]]
    return (
        f"  {res['workload']} atoms={res['atoms']} N={res['n']} chunk={res['chunk']}: "
        f"batched {1e3 * ref:.1f} ms; " + ", ".join(parts)
    )


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets on the graph model, with the measured values."""
    rows: list[tuple[str, str, bool]] = []
    for key in WORKLOADS:
        cases = [c for c in results["cases"] if c["workload"] == key and c["atoms"] == 32]
        target = next(c for c in cases if c["n"] == TARGET["n"] and c["chunk"] == TARGET["chunk"])
        ref_t, ref_m = _med(target["time"]["batched"]), target["memory"]["batched"]
        for s, lim in (("stream", 1.15), ("recompute", 1.45)):
            r = _med(target["time"][s]) / ref_t
            rows.append((f"({key}) {s} time <= {lim}x batched, 32 atoms, N=64, chunk 16",
                         f"{r:.2f}x", r <= lim))  # fmt: skip
        for s in ("recompute", "stream"):
            frac = target["memory"][s] / max(ref_m, 1)
            name = f"({key}) {s} peak memory <= 1/3 of batched"
            rows.append((name, f"{frac:.3f}", frac <= 1 / 3))
        at16 = [c for c in cases if c["chunk"] == TARGET["chunk"] and c["n"] >= 16]
        if len(at16) >= 2:
            lo = min(at16, key=lambda c: c["n"])
            hi = max(at16, key=lambda c: c["n"])
            for s in ("recompute", "stream"):
                growth = hi["memory"][s] / max(lo["memory"][s], 1)
                rows.append((f"({key}) {s} memory N={lo['n']} -> N={hi['n']} at chunk 16 <= 1.1x",
                             f"{growth:.2f}x", growth <= 1.1))  # fmt: skip
    return rows


def ratio_header(lead: Sequence[str]) -> list[str]:
    """The header rows of a table of time and memory ratios to ``batched``."""
    return [
        "| " + " | ".join(lead) + " | batched (ms) | "
        + " | ".join(f"{m} time" for m in METHODS[1:])
        + " | batched (MiB) | "
        + " | ".join(f"{m} memory" for m in METHODS[1:])
        + " |",
        "|" + "---:|" * (len(lead) + 2 * len(METHODS)),
    ]  # fmt: skip


def ratio_row(lead: Sequence[object], case: dict[str, Any]) -> str:
    """One case's row under :func:`ratio_header`: median times and peak memory ratios."""
    ref_t, ref_m = _med(case["time"]["batched"]), case["memory"]["batched"]
    return (
        "| " + " | ".join(str(v) for v in lead) + f" | {1e3 * ref_t:.1f} | "
        + " | ".join(f"{_med(case['time'][m]) / ref_t:.2f}" for m in METHODS[1:])
        + f" | {ref_m / 2**20:.2f} | "
        + " | ".join(f"{case['memory'][m] / max(ref_m, 1):.3f}" for m in METHODS[1:])
        + " |"
    )  # fmt: skip


def write_report(results: dict[str, Any], out: Path, header: str) -> None:
    """``batched.md`` and ``batched.png`` under ``out``."""
    comb = results["combination"]
    lines = [
        "# Batched execution",
        "",
        header,
        "",
        f"Combination `{comb}` (defaults), loss on the combined prediction. Ratios are to "
        "`batched` (all poses of the compound in one forward and one backward, every graph "
        "kept) in the same run; `per-pose` is the full graph with one pose per model call. "
        "Peak memory is the peak of live tensor bytes during one step above what was live "
        "before it.",
        "",
    ]
    for key, work in WORKLOADS.items():
        lines += [f"## {work.label}", ""]
        lines += ratio_header(["atoms", "N", "chunk"])
        for c in results["cases"]:
            if c["workload"] == key:
                lines.append(ratio_row([c["atoms"], c["n"], c["chunk"]], c))
        lines.append("")
    if results["extra"]:
        lines += [
            "## Other combinations at the target case (32 atoms, N = 64, chunk 16)",
            "",
            "The default smooth minimum (`pred_scale=1000`) gives most poses a weight of exactly "
            "zero, and recompute and stream skip their backward passes. These combinations "
            "weight every pose (Boltzmann needs two stream sums, so two backward passes per "
            "chunk).",
            "",
            "| model | combination | " + " | ".join(f"{m} time" for m in METHODS[1:]) + " |",
            "|---|---|" + "---:|" * (len(METHODS) - 1),
        ]
        for c in results["extra"]:
            ref_t = _med(c["time"]["batched"])
            lines.append(
                f"| {c['workload']} | `{c['combination']}` | "
                + " | ".join(f"{_med(c['time'][m]) / ref_t:.2f}" for m in METHODS[1:])
                + " |"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, ok in results["targets"]:
        lines.append(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")
    lines += ["", "![time and memory ratios to the batched full graph](batched.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "batched.md").write_text("\n".join(lines))
    _plot(results, out / "batched.png")


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row, key in enumerate(WORKLOADS):
        cases = [c for c in results["cases"] if c["workload"] == key and c["atoms"] == 32]
        by_n = sorted((c for c in cases if c["chunk"] == min(16, c["n"])), key=lambda c: c["n"])
        by_chunk = sorted((c for c in cases if c["n"] == TARGET["n"]), key=lambda c: c["chunk"])
        panels = (
            (axes[row][0], by_n, "n", "time", "poses per compound N (chunk 16)"),
            (axes[row][1], by_chunk, "chunk", "time", "chunk size (N = 64)"),
            (axes[row][2], by_n, "n", "memory", "poses per compound N (chunk 16)"),
        )
        for ax, series, x, what, xlabel in panels:
            xs = [c[x] for c in series]
            for m in METHODS[1:]:
                if what == "time":
                    ys = [_med(c["time"][m]) / _med(c["time"]["batched"]) for c in series]
                else:
                    ys = [c["memory"][m] / max(c["memory"]["batched"], 1) for c in series]
                ax.plot(xs, ys, "o-", label=m)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            if what == "memory":
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{what} / batched full graph")
            ax.set_title(f"{key}, 32 atoms: {what}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].legend()
    fig.suptitle(f"combination {results['combination']}: ratios to the batched full graph")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
