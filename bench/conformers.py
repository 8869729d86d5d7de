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

needs the ``chem`` extra. Results go to ``--out`` (JSON, default
``docs/bench/conformers.json``) and a Markdown table on stdout, the one in
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
}


def _config(args: argparse.Namespace, seed: int, arm: dict[str, Any]) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": "chembl",
            "reader": {
                "limit": args.compounds,
                "conformers": arm.get("conformers", args.conformers),
            },
            "combination": arm["combination"],
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


def _schnet(config: TrainConfig) -> tuple[Tensor, Tensor, list[str], float]:
    """Train one arm; return held-out predictions, values, names and seconds per epoch.

    Through the public app: ``train`` writes the run, ``load`` rebuilds its saved model
    and ``predict`` predicts the held-out compounds.
    """
    data = load_data(config)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        result = train(config, progress=False, run_dir=run, data=data)
        pred = predict([load(run)], data.test).combined.double()
    target = torch.stack([c.target for c in data.test]).double()
    return pred, target, [str(c.name) for c in data.test], result.metrics["time_per_epoch_s"]


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


def _ridge(config: TrainConfig) -> tuple[Tensor, Tensor, list[str], float]:
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
    return xt @ w + b, yt, [str(c.name) for c in data.test], time.perf_counter() - start


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compounds", type=int, default=400)
    parser.add_argument("--conformers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("docs/bench/conformers.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "arms": {}}
    results["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    arms = {**{k: (_schnet, v) for k, v in ARMS.items()}, "Morgan + ridge (2D)": (_ridge, {})}
    for label, (fn, arm) in arms.items():
        preds, targets, per_seed, seconds = [], [], [], []
        for seed in args.seeds:
            cfg = _config(args, seed, arm or ARMS["mean"])
            pred, target, _, secs = fn(cfg)
            preds.append(pred)
            targets.append(target)
            per_seed.append(_scores(pred, target))
            seconds.append(secs)
            print(f"{label} seed {seed}: {per_seed[-1]} ({secs:.2f} s)", flush=True)
        pooled_p, pooled_t = torch.cat(preds), torch.cat(targets)
        results["arms"][label] = {
            "per_seed": per_seed,
            "pooled": _scores(pooled_p, pooled_t),
            "ci95": _bootstrap(pooled_p, pooled_t),
            "seconds": seconds,
            "held_out": len(pooled_t),
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
