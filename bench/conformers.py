"""Conformer ensembles on a real ChEMBL series: which combination predicts best?

Trains SchNet (through ``combframe.app``, exactly as ``combframe train data=chembl`` does)
on RDKit's CHEMBL2321810 series (pIC50) with K generated conformers per compound, and
compares one conformer against ``mean``, a smooth minimum (``max`` with
``negate_preds``) and ``boltzmann`` over K conformers, next to a 2D baseline that needs
no conformers: Morgan fingerprints (radius 2, 2048 bits) and ridge regression (closed
form, the penalty chosen by 5-fold cross-validation on the training compounds). Every
arm sees the same random split of each seed. Held-out RMSE, MAE and Spearman are
reported per seed and pooled over the seeds' held-out compounds, with 95% bootstrap
intervals (2,000 resamples of the pooled compounds).

    python bench/conformers.py --compounds 400 --conformers 8 --epochs 20 --seeds 0 1 2

``--arms`` picks other arms: ``boltzmann`` with a learned kT (``learn=["kT"]``) and with
the conformers' MMFF energies as a prior (``prior.field=mmff_energy prior.kind=energy``,
which needs ``--minimize``: MMFF-minimised conformers). Each arm's fitted settings (a
learned kT's final value, the ridge penalty, the spread of the per-conformer
predictions) are kept per seed, and every arm's held-out predictions with its RMSE and
MAE minus the first arm's on the same compounds, with a paired bootstrap interval (the
same resamples for both arms: it can tell apart arms whose own intervals overlap). The run
needs the ``chem`` extra. Results go to ``--out`` (JSON, default
``docs/bench/conformers.json``) and Markdown tables on stdout, those in
``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from combframe.app.chem import morgan_fingerprints
from combframe.app.config import TrainConfig
from combframe.app.metrics import spearman
from combframe.app.predict import load, predict
from combframe.app.train import load_data, train

ARMS: dict[str, dict[str, Any]] = {
    "single conformer": {"combination": {"name": "mean"}, "conformers": 1},
    "mean": {"combination": {"name": "mean"}},
    "smooth min": {"combination": {"name": "max", "negate_preds": True, "pred_scale": 1.0}},
    "boltzmann": {"combination": {"name": "boltzmann", "kT": 1.0}},
    "boltzmann, learned kT": {"combination": {"name": "boltzmann", "kT": 1.0, "learn": ["kT"]}},
    "boltzmann + MMFF prior": {
        "combination": {"name": "boltzmann", "kT": 1.0},
        "prior": {"field": "mmff_energy", "kind": "energy"},
    },
    "boltzmann, learned kT + MMFF prior": {
        "combination": {"name": "boltzmann", "kT": 1.0, "learn": ["kT"]},
        "prior": {"field": "mmff_energy", "kind": "energy"},
    },
}

#: The arms of the table in docs/results.md (``--arms`` default), and the 2D baseline.
TABLE = ["single conformer", "mean", "smooth min", "boltzmann"]
RIDGE = "Morgan + ridge (2D)"


def _config(args: argparse.Namespace, seed: int, arm: dict[str, Any]) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": "chembl",
            "reader": {
                "limit": args.compounds,
                "conformers": arm.get("conformers", args.conformers),
                "minimize": args.minimize,
            },
            "combination": arm["combination"],
            "prior": arm.get("prior", {}),
            "strategy": "stream",
            "chunk_size": args.conformers,
            "model": {"name": "schnet", "interactions": 2, "cutoff": 5.0, "gaussians": 25},
            "hidden": 32,
            "epochs": args.epochs,
            "batch_size": 16,
            "seed": seed,
            "test_fraction": 0.2,
            "plot": False,
        }
    )


def _schnet(config: TrainConfig) -> tuple[Tensor, Tensor, dict[str, Any], float]:
    """Train one arm; return held-out predictions, values, what was fitted, s/epoch.

    What was fitted: the final combination (a learned kT's value) and the mean spread
    (max - min) of the held-out compounds' per-conformer predictions.

    Through the public app: ``train`` writes the run, ``load`` rebuilds its saved model
    and ``predict`` predicts the held-out compounds.
    """
    data = load_data(config)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        result = train(config, progress=False, run_dir=run, data=data)
        model = load(run)
        out = predict([model], data.test)
    target = torch.stack([c.target for c in data.test]).double()
    count = len(data.test)
    low = torch.full((count,), math.inf, dtype=torch.float64)
    high = torch.full((count,), -math.inf, dtype=torch.float64)
    low = low.scatter_reduce(0, out.index, out.per_pose, "amin")
    high = high.scatter_reduce(0, out.index, out.per_pose, "amax")
    fitted = {
        "combination": model.combination.to_config(),  # a learned kT: its final value
        "pose_spread": float((high - low).mean()),  # per-conformer max - min, mean
    }
    return out.combined.double(), target, fitted, result.metrics["time_per_epoch_s"]


def _smiles() -> dict[str, str]:
    from importlib import resources

    path = resources.files("rdkit").joinpath("Contrib", "FreeWilson", "data", "CHEMBL2321810.smi")
    pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {p[1]: p[0] for p in pairs}


def _ridge_fit(x: Tensor, y: Tensor, penalty: float) -> tuple[Tensor, Tensor]:
    mean_x, mean_y = x.mean(0), y.mean()
    xc = x - mean_x
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(xc.T @ xc + penalty * eye, xc.T @ (y - mean_y))
    return w, mean_y - mean_x @ w


def _ridge(config: TrainConfig) -> tuple[Tensor, Tensor, dict[str, Any], float]:
    """The 2D baseline on the same split as the SchNet arms of ``config``'s seed."""
    data = load_data(config)
    smiles = _smiles()

    def features(compounds: Any) -> tuple[Tensor, Tensor]:
        fp = morgan_fingerprints([smiles[str(c.name)] for c in compounds])
        return torch.from_numpy(fp), torch.stack([c.target for c in compounds]).double()

    start = time.perf_counter()
    x, y = features(data.train)
    folds = torch.arange(len(y)) % 5
    best = min(
        (10.0**k for k in range(-1, 4)),
        key=lambda pen: sum(
            float(((x[folds == f] @ w + b - y[folds == f]) ** 2).sum())
            for f in range(5)
            for w, b in [_ridge_fit(x[folds != f], y[folds != f], pen)]
        ),
    )
    w, b = _ridge_fit(x, y, best)
    xt, yt = features(data.test)
    return xt @ w + b, yt, {"ridge_penalty": best}, time.perf_counter() - start


def _scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    err = pred - target
    return {
        "rmse": float(err.pow(2).mean().sqrt()),
        "mae": float(err.abs().mean()),
        "spearman": spearman(pred, target),
    }


def _bootstrap(pred: Tensor, target: Tensor, draws: int = 2000) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(12345)
    samples: dict[str, list[float]] = {"rmse": [], "mae": [], "spearman": []}
    for _ in range(draws):
        idx = torch.randint(len(pred), (len(pred),), generator=gen)
        for key, value in _scores(pred[idx], target[idx]).items():
            samples[key].append(value)
    out = {}
    for key, values in samples.items():
        finite = torch.tensor([v for v in values if math.isfinite(v)])
        out[key] = [float(finite.quantile(0.025)), float(finite.quantile(0.975))]
    return out


def _paired(pred: Tensor, base: Tensor, target: Tensor, draws: int = 2000) -> dict[str, Any]:
    """RMSE and MAE of ``pred`` minus those of ``base`` on the same compounds, with 95%
    intervals of a paired bootstrap (the same resamples for both)."""
    gen = torch.Generator().manual_seed(12345)
    diffs: dict[str, list[float]] = {"rmse": [], "mae": []}
    for _ in range(draws):
        idx = torch.randint(len(pred), (len(pred),), generator=gen)
        mine, theirs = _scores(pred[idx], target[idx]), _scores(base[idx], target[idx])
        for key, values in diffs.items():
            values.append(mine[key] - theirs[key])
    mine, theirs = _scores(pred, target), _scores(base, target)
    out: dict[str, Any] = {}
    for key, values in diffs.items():
        q = torch.tensor(values, dtype=torch.float64).quantile(
            torch.tensor([0.025, 0.975]).double()
        )
        out[key] = {"diff": mine[key] - theirs[key], "ci95": q.tolist()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compounds", type=int, default=400)
    parser.add_argument("--conformers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[*ARMS, RIDGE],
        default=[*TABLE, RIDGE],
        help="arms to run (default: the table of docs/results.md)",
    )
    parser.add_argument(
        "--minimize", action="store_true", help="MMFF-minimise the conformers (the prior arms)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench/conformers.json"))
    args = parser.parse_args()
    if any("prior" in ARMS.get(a, {}) for a in args.arms) and not args.minimize:
        parser.error("the MMFF prior arms need --minimize (mmff_energy of minimised conformers)")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "arms": {}}
    results["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    for label in args.arms:
        fn, arm = (_ridge, ARMS["mean"]) if label == RIDGE else (_schnet, ARMS[label])
        preds, targets, per_seed, seconds, fitted = [], [], [], [], []
        for seed in args.seeds:
            pred, target, settings, secs = fn(_config(args, seed, arm))
            preds.append(pred)
            targets.append(target)
            per_seed.append(_scores(pred, target))
            seconds.append(secs)
            fitted.append(settings)
            print(f"{label} seed {seed}: {per_seed[-1]} {settings} ({secs:.2f} s)", flush=True)
        pooled_p, pooled_t = torch.cat(preds), torch.cat(targets)
        first = next(iter(results["arms"].values()), None)
        paired = None
        if first is not None and torch.equal(torch.tensor(first["target"]).double(), pooled_t):
            paired = _paired(pooled_p, torch.tensor(first["pred"]).double(), pooled_t)
        results["arms"][label] = {
            "per_seed": per_seed,
            "pooled": _scores(pooled_p, pooled_t),
            "ci95": _bootstrap(pooled_p, pooled_t),
            "seconds": seconds,
            "fitted": fitted,
            "held_out": len(pooled_t),
            "paired_with_first": paired,
            "pred": pooled_p.tolist(),
            "target": pooled_t.tolist(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| model | RMSE | MAE | Spearman |",
        "|---|---|---|---|",
    ]
    for label, arm in results["arms"].items():
        cells = [
            f"{arm['pooled'][k]:.3f} [{arm['ci95'][k][0]:.3f}, {arm['ci95'][k][1]:.3f}]"
            for k in ("rmse", "mae", "spearman")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(iter(results["arms"]))
    lines += ["", f"| model | RMSE minus {first}'s | MAE minus {first}'s |", "|---|---|---|"]
    for label, arm in results["arms"].items():
        paired = arm["paired_with_first"]
        if paired is not None:
            cells = [
                "{:+.3f} [{:+.3f}, {:+.3f}]".format(paired[k]["diff"], *paired[k]["ci95"])
                for k in ("rmse", "mae")
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
