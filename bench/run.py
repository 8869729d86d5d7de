"""Benchmark combframe's gradient strategies against the full-graph reference.

One command produces every table and plot under ``docs/bench/``::

    python bench/run.py            # full run (N = 1, 8, 32, 128)
    python bench/run.py --quick    # small run (N = 1, 8), written to build/bench-quick

In one process, and interleaved in a shuffled order for every repetition, it times one
training step (zero grads, forward over N poses, loss on the combined prediction,
backward) of

* ``reference``: the full graph a user writes by hand (all N pose graphs kept),
* ``loop``: the published per-parameter Python loop over a dict of gradient lists,
* ``store``, ``recompute``, ``stream``: :class:`combframe.MultiPoseModel` strategies,

and reports medians and ratios to the reference. Peak memory of one step is measured
in a fresh subprocess per (model, method, N): on CPU the peak live tensor bytes from
the torch profiler's memory events (what the targets use), and the growth of the peak
resident set over the baseline after imports, model, poses and a warm-up step (which
also counts the C allocator's caching); on CUDA ``torch.cuda.max_memory_allocated``
over the allocated baseline. The combine step (store's backward: its matrix-vector
product and the gradients written, against the loop's from the same gradients; alone
with ``--suite combine``) is compared with the machine's streaming-read bandwidth,
measured with a sum over a large tensor.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _loop_baseline import collect_grad_dict, loop_backward, loop_step
from _models import MODELS, BenchModel
from _timing import interleaved
from torch import Tensor, nn

import combframe
from combframe.testing import full_graph_gradients, make_loss, peak_tensor_bytes

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("reference", "loop", "store", "recompute", "stream")
STRATEGIES = ("store", "recompute", "stream")
#: Boltzmann weights are non-zero for every pose and need two stream accumulators:
#: the least favourable of the shipped combinations for recompute and stream.
COMBINATION = "boltzmann"
LOSS = make_loss("combined")
Step = Callable[[nn.Module, Sequence[Tensor]], object]


def make_step(method: str, combination: combframe.Combination) -> Step:
    """One training step of ``method``; gradients end up in the parameters' ``.grad``."""
    if method == "reference":
        return lambda model, poses: full_graph_gradients(model, combination, poses, LOSS)
    if method == "loop":
        return lambda model, poses: loop_step(model, combination, poses, LOSS)
    if method in STRATEGIES:
        wrapped: dict[int, combframe.MultiPoseModel] = {}  # built once per model, as a user would

        def step(model: nn.Module, poses: Sequence[Tensor]) -> list[Tensor]:
            if id(model) not in wrapped:
                wrapped[id(model)] = combframe.MultiPoseModel(model, combination, strategy=method)
            model.zero_grad(set_to_none=True)
            combined, per_pose = wrapped[id(model)](list(poses))
            LOSS(combined, per_pose).backward()
            # the same copy full_graph_gradients makes
            return [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in model.parameters()
                if p.requires_grad
            ]

        return step
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


class Timer:
    """Seconds taken by ``fn``.

    CUDA: CUDA events after a synchronize. CPU, ``clock="cpu"`` (the default): CPU time
    of this process, which with one intra-op thread is the step's wall time on an idle
    machine but does not count time spent waiting while other programs use the cores.
    ``clock="wall"``: wall-clock time.
    """

    def __init__(self, device: torch.device, clock: str = "cpu") -> None:
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        t0 = self.clock()
        fn()
        return self.clock() - t0


# ---- correctness guard --------------------------------------------------------------
def check_methods_agree(bench: BenchModel, device: torch.device, n: int = 4) -> float:
    """Worst relative gradient difference of every method to the reference (float32)."""
    combination = combframe.create_combination(COMBINATION)
    poses = bench.poses(n, device, seed=1)
    grads = {}
    for method in METHODS:
        model = bench.build(0).to(device)
        make_step(method, combination)(model, poses)
        grads[method] = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
    worst = 0.0
    for method in METHODS[1:]:
        for got, want in zip(grads[method], grads["reference"], strict=True):
            scale = max(want.abs().max().item(), 1e-30)
            worst = max(worst, (got - want).abs().max().item() / scale)
    if worst > 1e-3:
        raise SystemExit(f"methods disagree with the reference: worst relative error {worst:.2e}")
    return worst


# ---- step time ----------------------------------------------------------------------
def time_steps(
    bench: BenchModel, ns: Sequence[int], reps: int, timer: Timer, device: torch.device, seed: int
) -> dict[int, dict[str, list[float]]]:
    """Seconds per step, ``{N: {method: [reps]}}``, methods interleaved in shuffled order."""
    combination = combframe.create_combination(COMBINATION)
    models = {m: bench.build(0).to(device) for m in METHODS}
    steps = {m: make_step(m, combination) for m in METHODS}
    order = random.Random(seed)
    out: dict[int, dict[str, list[float]]] = {}
    for n in ns:
        poses = bench.poses(n, device)
        for m in METHODS:  # warm-up, not timed
            steps[m](models[m], poses)
        calls = {m: partial(steps[m], models[m], poses) for m in METHODS}
        out[n] = interleaved(calls, reps, order, timer)
        print(
            f"  {bench.key} N={n}: "
            + ", ".join(f"{m} {1e3 * statistics.median(v):.1f} ms" for m, v in out[n].items()),
            flush=True,
        )
    return out


# ---- peak memory (one subprocess per case) --------------------------------------------
def memory_worker(model_key: str, method: str, n: int, device_name: str, threads: int) -> None:
    """Print the peak memory of one step, in bytes, as JSON (run in a fresh process).

    ``tensor_bytes``: peak of live tensor memory during the step, over what was live
    before it (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the allocation and
    free events of the torch profiler, summed in time order). ``rss_bytes`` (CPU only):
    growth of the process's peak resident set over the baseline, which also counts the
    C allocator's caching and fragmentation.
    """
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    bench = MODELS[model_key]
    combination = combframe.create_combination(COMBINATION)
    model = bench.build(0).to(device)
    step = make_step(method, combination)
    poses = bench.poses(n, device)
    step(model, bench.poses(2, device, seed=3, atoms=1))  # load code paths, allocate .grad
    gc.collect()
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(model, poses)
        torch.cuda.synchronize()
        result["tensor_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        if _reset_peak_rss():
            # Linux: the high-water mark is reset to the current RSS, so it is not masked
            # by transient peaks of the imports (or inherited from the parent process).
            base = _proc_status_bytes("VmHWM")
            step(model, poses)
            result["rss_bytes"] = _proc_status_bytes("VmHWM") - base
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            step(model, poses)
            result["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base
        result["tensor_bytes"] = peak_tensor_bytes(lambda: step(model, poses))
    print(json.dumps(result))


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def measure_memory(
    bench: BenchModel, ns: Sequence[int], device: torch.device, threads: int
) -> dict[int, dict[str, dict[str, int]]]:
    """Peak bytes of one step, ``{N: {method: {kind: bytes}}}``, each in a fresh subprocess."""
    out: dict[int, dict[str, dict[str, int]]] = {}
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    for n in ns:
        out[n] = {}
        for method in METHODS:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-worker",
                bench.key,
                method,
                str(n),
                "--device",
                str(device),
                "--threads",
                str(threads),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(
                    f"memory worker failed for {bench.key}/{method}/N={n}:\n{done.stderr}"
                )
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
            out[n][method] = {k: int(v) for k, v in json.loads(line).items()}
        print(
            f"  {bench.key} N={n}: "
            + ", ".join(f"{m} {v['tensor_bytes'] / 2**20:.1f} MiB" for m, v in out[n].items()),
            flush=True,
        )
    return out


# ---- combine step alone ---------------------------------------------------------------
def read_bandwidth(device: torch.device, timer: Timer, reps: int) -> float:
    """Streaming-read bandwidth in bytes/s: best time of ``sum`` over a 256 MiB tensor.

    The best of several runs is what the memory system can deliver; taking it makes the
    combine step's fraction of it conservative.
    """
    big = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    big.sum()
    times = [timer(big.sum) for _ in range(reps)]
    return big.numel() * 4 / min(times)


def time_combine(
    bench: BenchModel, ns: Sequence[int], timer: Timer, device: torch.device, reps: int
) -> dict[int, dict[str, float]]:
    """Median seconds of store's backward and of the loop's, from the same gradients.

    store: ``loss.backward()`` after a forward of ``MultiPoseModel(strategy="store")``
    run outside the timer, i.e. what a user's backward does: the loss's and the
    combination's backward to the coefficients, the contraction of the ``(N, P)``
    buffer with them, every parameter's ``.grad`` written. loop: the same from the
    per-pose gradients the published loop collected (outside the timer): the
    coefficients by autograd, its per-parameter, per-pose loop, ``.grad`` assigned.
    """
    combination = combframe.create_combination(COMBINATION)
    model = bench.build(0).to(device)
    wrapped = combframe.MultiPoseModel(model, combination, strategy="store")
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: dict[int, dict[str, float]] = {}
    for n in ns:
        poses = list(bench.poses(n, device))
        preds, grad_dict = collect_grad_dict(model, poses)
        loop = partial(loop_backward, model, combination, preds, grad_dict, LOSS)

        def store_loss(poses: list[Tensor] = poses) -> Tensor:
            model.zero_grad(set_to_none=True)
            combined, per_pose = wrapped(poses)
            loss: Tensor = LOSS(combined, per_pose)
            return loss

        store_loss().backward()
        got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        loop()
        want = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(map(partial(torch.allclose, rtol=1e-4, atol=1e-6), got, want)), "store != loop"
        t_store, t_loop = [], []
        for _ in range(reps):
            t_store.append(timer(store_loss().backward))  # the forward is outside the timer
            model.zero_grad(set_to_none=True)
            t_loop.append(timer(loop))
        out[n] = {
            "store": statistics.median(t_store),
            "loop": statistics.median(t_loop),
            "bytes": float(n * numel * 4),
        }
    return out


# ---- report -----------------------------------------------------------------------------
def _med(v: Sequence[float]) -> float:
    return statistics.median(v)


def write_report(results: dict[str, Any], out: Path) -> None:
    """``results.md``, ``results.json`` and one PNG per model under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python bench/run.py{' --quick' if results['quick'] else ''}` on "
        f"{results['date']}: {results['device_desc']}, torch {results['torch']}, "
        f"{results['threads']} intra-op thread(s), combination `{COMBINATION}` "
        "(every pose weighted, two stream accumulators), loss on the combined prediction, "
        f"{results['reps']} interleaved repetitions per N (medians of {results['clock']}; CPU "
        "time of the process, with one thread, is the step's wall time on an idle machine "
        "without the time lost to other programs sharing the cores). Every method's gradients "
        f"agreed with the reference before timing (worst relative difference "
        f"{max(results['agreement'].values()):.1e}, float32).",
        "",
        "Ratios are to the full-graph reference at the same N. Peak memory is that of one "
        "step above what was live before it (model, poses, gradients), measured in a fresh "
        f"process per case: {results['memory_kind']}.",
        "",
    ]
    for key, res in results["models"].items():
        bench = MODELS[key]
        lines += [
            f"## {bench.label}",
            "",
            f"{res['params']:,} parameters in {res['tensors']} tensors.",
            "",
            "| N | method | step time (ms) | time / reference | peak tensor memory (MiB) "
            "| memory / reference | peak RSS growth (MiB) |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for n_key, times in res["time"].items():
            mem = res["memory"][n_key]
            t_ref, m_ref = _med(times["reference"]), mem["reference"]["tensor_bytes"]
            for m in METHODS:
                rss = mem[m].get("rss_bytes")
                lines.append(
                    f"| {n_key} | {m} | {1e3 * _med(times[m]):.1f} | {_med(times[m]) / t_ref:.2f} "
                    f"| {mem[m]['tensor_bytes'] / 2**20:.2f} "
                    f"| {mem[m]['tensor_bytes'] / max(m_ref, 1):.3f} "
                    f"| {'n/a' if rss is None else f'{rss / 2**20:.1f}'} |"
                )
        lines.append("")
        lines.append(f"![peak memory and step time vs N, model {key}]({key}.png)")
        lines.append("")
    lines += combine_section(results["combine"], results["bandwidth"])
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, ok in results["targets"]:
        lines.append(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    _plot(results, out)


def combine_section(comb: dict[str, dict[str, float]], bw: float) -> list[str]:
    """The Markdown section of the combine step: what is timed, and the table."""
    lines = [
        "## Combine step (model (a))",
        "",
        f"Streaming-read bandwidth (best of 9 `sum`s over a 256 MiB float32 tensor): "
        f"**{bw / 1e9:.1f} GB/s**. Store's combine step is timed as a user meets it: "
        "`loss.backward()` after a store forward (run outside the timer), which takes the "
        "loss and the combination back to the coefficients, multiplies the `(N, P)` buffer "
        "by them (one matrix-vector product, N·P·4 bytes read) and writes every "
        "parameter's `.grad`. The loop is the published per-parameter, per-pose loop over "
        "a dict of gradient lists, timed the same way from the gradients it collected "
        "(coefficients by autograd, the loop, `.grad` assigned). Store GB/s divides the "
        "buffer's bytes by the whole backward's time, so it understates the product's own "
        "speed; 100% means the backward streams the buffer as fast as one `sum` does, i.e. "
        "at memory speed. The loop moves the same bytes three to four times (a scaled copy, "
        "then an add, per pose and parameter), so on a CPU, where both are limited by "
        "memory traffic, its ratio to store stays near that. On a GPU each of the loop's "
        "2·N·(parameter tensors) small kernels costs a launch, so the gap is expected to be "
        "much wider there (run this script on one to measure it).",
        "",
        "| N | store backward (ms) | loop (ms) | loop / store | store GB/s | % of read bandwidth |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n_key, c in comb.items():
        gbs = c["bytes"] / c["store"]
        lines.append(
            f"| {n_key} | {1e3 * c['store']:.3f} | {1e3 * c['loop']:.3f} | "
            f"{c['loop'] / c['store']:.1f} | {gbs / 1e9:.1f} | {100 * gbs / bw:.0f}% |"
        )
    return lines


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    for key, res in results["models"].items():
        ns = [int(n) for n in res["time"]]
        fig, (ax_m, ax_t, ax_r) = plt.subplots(1, 3, figsize=(14, 4))
        for m in METHODS:
            t_ref = [_med(res["time"][str(n)]["reference"]) for n in ns]
            t = [_med(res["time"][str(n)][m]) for n in ns]
            ax_m.plot(ns, [_tensor_mib(res, n, m) for n in ns], "o-", label=m)
            ax_t.plot(ns, [1e3 * x for x in t], "o-", label=m)
            ax_r.plot(ns, [x / r for x, r in zip(t, t_ref, strict=True)], "o-", label=m)
        panels = (
            (ax_m, "peak tensor memory of one step (MiB)", True),
            (ax_t, "median step time (ms)", True),
            (ax_r, "step time / full-graph reference", False),
        )
        for ax, what, log_y in panels:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xticks(ns)
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel("poses per compound N")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
        ax_r.legend()
        fig.suptitle(f"{MODELS[key].label} ({results['clock']})")
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=100)
        plt.close(fig)


def _tensor_mib(res: dict[str, Any], n: int, method: str) -> float:
    return max(res["memory"][str(n)][method]["tensor_bytes"], 1) / 2**20


def evaluate_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets, with the measured values."""
    rows: list[tuple[str, str, bool]] = []
    a = results["models"].get("pointcloud")
    ns = sorted(int(n) for n in a["time"]) if a else []
    if a and 1 in ns:
        big = str(max(ns))
        for s in ("recompute", "stream"):
            own = _tensor_mib(a, int(big), s) / _tensor_mib(a, 1, s)
            ref = _tensor_mib(a, int(big), s) / _tensor_mib(a, int(big), "reference")
            rows.append(
                (f"(a) {s} peak at N={big} <= 1.1x its N=1 peak", f"{own:.2f}x", own <= 1.1)
            )
            rows.append(
                (f"(a) {s} peak at N={big} <= 1/20 of reference", f"1/{1 / ref:.0f}", ref <= 0.05)
            )
    limits = {"stream": 1.15, "store": 1.15, "recompute": 1.45}
    for key, res in results["models"].items():
        for s, lim in limits.items():
            worst = max(
                (_med(t[s]) / _med(t["reference"]) for n, t in res["time"].items() if int(n) >= 8),
                default=float("nan"),
            )
            rows.append(
                (
                    f"({key}) {s} step time <= {lim}x reference, N >= 8 (worst N)",
                    f"{worst:.2f}x",
                    worst <= lim,
                )
            )
    comb = results["combine"].get("32")
    if comb:
        speed = comb["loop"] / comb["store"]
        frac = comb["bytes"] / comb["store"] / results["bandwidth"]
        rows.append(("store combine >= 10x faster than loop at N=32", f"{speed:.1f}x", speed >= 10))
        rows.append(
            ("store combine >= 70% of read bandwidth at N=32", f"{100 * frac:.0f}%", frac >= 0.7)
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 8 and 3 repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="CPU: time steps by process CPU time (default with one thread) or wall clock",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions per N")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--suite",
        choices=("all", "per-pose", "batched", "combine"),
        default="all",
        help="per-pose: strategies against the per-pose full graph (results.md); batched: "
        "chunks against the batched full graph (batched.md); all: both; combine: the "
        "combine step alone, printed",
    )
    parser.add_argument(
        "--combination",
        default="max",
        help="combination of the batched suite (default max; mean and boltzmann are also "
        "reported at the target case)",
    )
    parser.add_argument(
        "--memory-worker", nargs=3, metavar=("MODEL", "METHOD", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_worker:
        key, method, n = args.memory_worker
        memory_worker(key, method, int(n), args.device, args.threads)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.suite == "combine":
        run_combine(args, device)
        return
    if args.suite in ("all", "batched"):
        run_batched(args, device)
    if args.suite == "batched":
        return
    ns = (1, 8) if args.quick else (1, 8, 32, 128)
    reps = args.reps or (3 if args.quick else 7)
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs" / "bench")
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    timer = Timer(device, clock)
    desc = _describe(device)
    results: dict[str, Any] = {
        "quick": args.quick,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "device_desc": desc,
        "clock": "CUDA events" if device.type == "cuda" else f"{clock} time",
        "threads": args.threads,
        "reps": reps,
        "models": {},
        "memory_kind": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak live tensor bytes from the torch profiler's allocation events (targets use "
        "this), and the growth of the peak resident set (VmHWM reset after set-up), which "
        "also counts the C allocator's caching and fragmentation",
        "agreement": {},
    }
    t0 = time.perf_counter()
    for key in args.models:
        bench = MODELS[key]
        print(f"{bench.label}: checking, timing, measuring memory", flush=True)
        results["agreement"][key] = check_methods_agree(bench, device)
        params = list(bench.build(0).parameters())
        results["models"][key] = {
            "params": sum(p.numel() for p in params),
            "tensors": len(params),
            "time": {
                str(n): v for n, v in time_steps(bench, ns, reps, timer, device, seed=7).items()
            },
            "memory": {
                str(n): v for n, v in measure_memory(bench, ns, device, args.threads).items()
            },
        }
    print("combine step and read bandwidth", flush=True)
    results["bandwidth"], results["combine"] = measure_combine(args.quick, timer, device)
    results["targets"] = evaluate_targets(results)
    results["seconds"] = time.perf_counter() - t0
    write_report(results, out)
    print(f"wrote {out}/results.md in {results['seconds']:.0f} s")
    for name, measured, ok in results["targets"]:
        print(f"  {'met    ' if ok else 'NOT MET'} {name}: {measured}")


def measure_combine(
    quick: bool, timer: Timer, device: torch.device
) -> tuple[float, dict[str, dict[str, float]]]:
    """The read bandwidth, and the combine step of model (a) at each N (see ``time_combine``)."""
    bandwidth = read_bandwidth(device, timer, reps=9)
    ns = (8, 32) if quick else (8, 32, 128)
    comb = time_combine(MODELS["pointcloud"], ns, timer, device, 15)
    return bandwidth, {str(n): v for n, v in comb.items()}


def run_combine(args: argparse.Namespace, device: torch.device) -> None:
    """The combine step alone, printed as its Markdown section."""
    timer = Timer(device, args.clock or ("cpu" if args.threads == 1 else "wall"))
    bandwidth, comb = measure_combine(args.quick, timer, device)
    print(f"{_describe(device)}, torch {torch.__version__}, {args.threads} thread(s)\n")
    print("\n".join(combine_section(comb, bandwidth)))


def run_batched(args: argparse.Namespace, device: torch.device) -> None:
    """The batched suite: chunks against the batched full graph, to ``batched.md``."""
    import batched

    reps = args.reps or (3 if args.quick else 7)
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs" / "bench")
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    timer = Timer(device, clock)
    extra = [c for c in ("mean", "boltzmann") if c != args.combination]
    t0 = time.perf_counter()
    print(f"batched suite ({args.combination}), {reps} repetitions", flush=True)
    results = batched.run_suite(args.combination, extra, timer, device, reps, args.quick)
    results["targets"] = batched.targets(results)
    command = "python bench/run.py --suite batched" + (" --quick" if args.quick else "")
    if device.type != "cpu":
        command += f" --device {device.type}"
    header = (
        f"Produced by `{command}` on {_dt.date.today().isoformat()}: {_describe(device)}, "
        f"torch {torch.__version__}, {args.threads} intra-op thread(s), medians of {reps} "
        f"interleaved repetitions ({'CUDA events' if device.type == 'cuda' else clock + ' time'}), "
        f"every method's gradients checked against the batched full graph first, in "
        f"{time.perf_counter() - t0:.0f} s."
    )
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    batched.write_report(results, out / f"batched{suffix}" if suffix else out, header)
    (out / f"batched{suffix}.json").write_text(json.dumps(results, indent=1))
    for name, measured, ok in results["targets"]:
        print(f"  {'met    ' if ok else 'NOT MET'} {name}: {measured}")


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
