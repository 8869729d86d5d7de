"""SchNet on real conformer ensembles: the strategies against the batched full graph.

One ChEMBL compound (RDKit's CHEMBL2321810 series, the median-sized molecule of the
first 50, heavy atoms only) with K = 8, 32 and 128 ETKDG conformers as its poses, and
the SchNet network ``combframe train`` builds (``model.name=schnet``: hidden 64, three
interactions, cutoff 5 Å, the last layer randomly initialised so every parameter gets a
gradient). One training step on the compound (forward, loss on the combined value,
backward) per method, the methods of ``bench/batched.py``:

* ``batched``: all K conformers in one PyG ``Batch``, one forward and one backward, every
  graph kept (the reference: what a user with enough memory writes);
* ``per-pose``: the full graph, one conformer per model call;
* ``store``, ``recompute``, ``stream``: :class:`combframe.MultiPoseModel` with chunks of 8
  conformers (``store`` runs them one at a time: its per-pose gradients of a chunk need
  ``torch.func.vmap``, which cannot map over a ``Batch``).

The methods run in the same process, interleaved in a shuffled order each round; times
are medians over the rounds, given as ratios to ``batched``. Peak memory is the peak of
live tensor bytes during one step above what was live before it (the torch profiler on
the CPU). Every method's gradients are checked against ``batched`` first.

    python bench/schnet.py --rounds 7 --out docs/bench

writes ``docs/bench/schnet.md`` and ``schnet.json``; needs the ``chem`` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from batched import (
    METHODS,
    Workload,
    check_agreement,
    make_steps,
    peak_bytes,
    ratio_header,
    ratio_row,
)

import combframe
from combframe.app.chem import conformer_poses
from combframe.app.models import SchNetNetwork
from combframe.app.readers import import_quietly

CHUNK = 8


def _smiles() -> str:
    path = resources.files("rdkit") / "Contrib" / "FreeWilson" / "data" / "CHEMBL2321810.smi"
    smiles = [line.split()[0] for line in path.read_text().splitlines()[:50]]
    from rdkit import Chem

    sizes = sorted((Chem.MolFromSmiles(s).GetNumHeavyAtoms(), s) for s in smiles)
    return sizes[len(sizes) // 2][1]


def _poses(smiles: str, k: int) -> list[Any]:
    Data = import_quietly("torch_geometric.data").Data
    atoms = conformer_poses(smiles, k, seed=0, minimize=False, hydrogens=False)
    return [
        Data(pos=torch.from_numpy(a.pos).float(), z=torch.from_numpy(a.z), lig=torch.ones(len(a.z)))
        for a in atoms
    ]


def _model() -> SchNetNetwork:
    torch.manual_seed(0)
    net = SchNetNetwork(hidden=64, interactions=3, cutoff=5.0, gaussians=25, offset=7.0)
    torch.nn.init.normal_(net.schnet.lin2.weight, std=0.1)
    return net


def _case(smiles: str, k: int, rounds: int, seed: int) -> dict[str, Any]:
    poses = _poses(smiles, k)
    work = Workload("schnet", "SchNet", _model, lambda *a: poses, None)
    model = work.build()
    combination = combframe.create_combination("max", negate_preds=True, pred_scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        steps = make_steps(work, model, poses, combination, CHUNK)
        agreement = check_agreement(steps, model)
        memory = {m: peak_bytes(steps[m], torch.device("cpu")) for m in METHODS}
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        order = torch.Generator().manual_seed(seed)
        for _ in range(rounds):
            for i in torch.randperm(len(METHODS), generator=order).tolist():
                start = time.perf_counter()
                steps[METHODS[i]]()
                times[METHODS[i]].append(time.perf_counter() - start)
    atoms = int(poses[0].z.numel())
    return {
        "k": len(poses),
        "atoms": atoms,
        "time": times,
        "memory": memory,
        "agreement": agreement,
    }


def _report(results: dict[str, Any]) -> str:
    lines = [
        "# SchNet on conformer ensembles: strategies against the batched full graph",
        "",
        f"Made by `{results['command']}` on {results['machine']} "
        "(2 shared CPU cores, other jobs running: the ratios, measured interleaved in one "
        "process, are what to read; the absolute times are not).",
        "",
        f"One ChEMBL compound ({results['atoms']} heavy atoms) with K ETKDG conformers; "
        "SchNet (hidden 64, 3 interactions, cutoff 5 Å); smooth minimum "
        "(`max`, `negate_preds=true`, `pred_scale=1`); chunks of 8 conformers. Time: median "
        f"of {results['rounds']} interleaved rounds of one training step on the compound, "
        "as a ratio to `batched` (all K conformers in one PyG `Batch`, every graph kept). "
        "Memory: peak live tensor bytes of one step, as a ratio to `batched`.",
        "",
        *ratio_header(["K"]),
    ]
    lines += [ratio_row([c["k"]], c) for c in results["cases"]]
    worst = max(c["agreement"] for c in results["cases"])
    lines += [
        "",
        f"Largest relative gradient difference to `batched`: {worst:.1e} (float32).",
        "",
        "`recompute` and `stream` keep one chunk's graph (8 conformers) alive, so their "
        "peak memory falls as 8/K of the batched graph's; `store` runs the conformers one "
        "at a time and keeps K per-pose gradients of its 63,233 parameters instead. "
        "`stream` does one forward and one backward per chunk and costs about what the "
        "batched graph does; `recompute` runs each chunk's forward twice.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    smiles = _smiles()
    cases = []
    for i, k in enumerate(args.ks):
        cases.append(_case(smiles, k, args.rounds, seed=i))
        print(f"K={k}: done", flush=True)
    results = {
        "command": f"python bench/schnet.py --rounds {args.rounds}",
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "rounds": args.rounds,
        "atoms": cases[0]["atoms"],
        "smiles": smiles,
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "schnet.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "schnet.md").write_text(_report(results))
    print(_report(results))


if __name__ == "__main__":
    main()
