"""A run's predictions and verdict: held-out metrics, divergence, ``metrics.json``, models.

:func:`predict_compounds` predicts a run's compounds (sharded over the ranks);
:func:`run_metrics` evaluates the trained model (:mod:`combframe.app.metrics` holds the
math) and refuses a diverged run with :class:`TrainingDivergedError`, whose message
(:func:`diverged`) says what likely caused it; :func:`save_models` writes the final model
and, with a validation split, the best one (:mod:`combframe.app.saved`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import combframe
from combframe.app.building import Run, target_stats
from combframe.app.config import saved_config
from combframe.app.data import Compound
from combframe.app.memory import process_peak_rss_mb
from combframe.app.metrics import (
    DIVERGENCE_FACTOR,
    baseline_note,
    divergence,
    held_out_metrics,
    multi_target_metrics,
    per_target,
    rmse,
)
from combframe.app.priors import log_priors
from combframe.app.readers import missing_note, skipped_note
from combframe.app.runs import RunResult, tensorboard_note
from combframe.app.saved import save_model
from combframe.errors import CombframeError

__all__ = [
    "TrainingDivergedError",
    "diverged",
    "predict_compounds",
    "run_metrics",
    "save_models",
]


#: Compounds per evaluation call.
_EVAL_BATCH = 64


class TrainingDivergedError(CombframeError, RuntimeError):
    """Training diverged: a non-finite loss or a final RMSE far above the values' spread.

    ``same_on_every_rank`` is True when every process reached the verdict together (from
    metrics reduced over the ranks), False when one process found a non-finite loss.
    """

    def __init__(self, message: str, *, same_on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


def predict_compounds(run: Run, compounds: Sequence[Compound]) -> tuple[Tensor, Tensor]:
    """Predict ``compounds``; return predictions and values, float64 on the CPU, in order."""
    local = run.ranks.shard(compounds)
    parts = []
    with torch.no_grad():
        for i in range(0, len(local), _EVAL_BATCH):
            chunk = local[i : i + _EVAL_BATCH]
            poses, prior = [list(c.poses) for c in chunk], log_priors(chunk)
            parts.append(run.model(compounds=poses, prior=prior).combined)
    pred = torch.cat(parts) if parts else torch.zeros(0)
    pred = run.ranks.gather(pred.detach().double().cpu())
    target = torch.stack([c.target for c in compounds]).detach().double().cpu()
    return pred, target


def run_metrics(run: Run) -> RunResult:
    """Evaluate the trained model, check for divergence and assemble ``metrics.json``."""
    test, notes = _held_out(run)
    train_pred, train_target = predict_compounds(run, run.data.train)
    train_rmse = rmse(train_pred, train_target)
    _check_divergence(run, train_pred, train_target, test)
    p = run.progress
    combination = trained_combination(run)
    metrics: dict[str, Any] = {
        "combination": combination,
        "strategy": run.config.strategy,
        "strategy_chosen": _chosen(run),
        "device": str(run.device),
        "processes": run.ranks.world,
        "data": {
            "source": run.data.source,
            "kind": run.data.kind,
            "features": run.data.features,
            "skipped": len(run.data.skipped),
        },
        "test": test,
        "train": {"rmse": train_rmse, "compounds": len(run.data.train)},
        "validation": _validation(run),
        "epochs_trained": p.epoch,
        "stopped_early": p.stopped_early,
        "time_per_epoch_s": sum(p.seconds) / len(p.seconds),
        "peak_memory_bytes": _peak_bytes(run),
        "peak_memory_kind": p.peak_kind or "not measured (memory=false)",
        "process_peak_rss_mb": process_peak_rss_mb(),
        "history": p.history,
        "versions": _versions(),
    }
    return RunResult(combination=combination, metrics=metrics, notes=notes)


def trained_combination(run: Run) -> dict[str, Any]:
    """Return the run's resolved combination with its learned parameters' final values.

    ``"learn"`` names the learned ones; the config holds only their starting values.
    """
    resolved: dict[str, Any] = run.config.model_dump(mode="json")["combination"]
    combination = run.model.combination
    settings = combination.settings()  # reads the learned values (a device sync, once)
    return {**resolved, **{name: getattr(settings, name) for name in combination.learn}}


def _check_divergence(run: Run, pred: Tensor, target: Tensor, test: dict[str, Any]) -> None:
    """Refuse a diverged run (:func:`divergence`); several targets: each on its own values."""
    names = run.data.targets
    if not names:
        why = divergence(rmse(pred, target), test["rmse"], _values(run))
    else:
        every = _all_targets(run)
        for j, (name, (p, y)) in enumerate(per_target(pred, target, names).items()):
            column = every[:, j][every[:, j].isfinite()].tolist()
            why = divergence(rmse(p, y), test["targets"][name]["rmse"], column)
            why = None if why is None else f"{name}: {why}"
            if why is not None:
                break
    if why is not None:
        raise diverged(run, 0, why)


def _held_out(run: Run) -> tuple[dict[str, Any], list[str]]:
    """Compute held-out metrics (None where undefined) with 95% intervals, and notes.

    Several targets: per target (keyed by name under ``targets``) and their means.
    """
    pred, target = predict_compounds(run, run.data.test)
    names = run.data.targets
    mean_train = target_stats(run.data.train, names)[0]
    baselines: list[str | None] = []
    if names:
        test, notes = multi_target_metrics(pred, target, names, seed=run.config.seed)
        for j, (name, (_, y)) in enumerate(per_target(pred, target, names).items()):
            row = test["targets"][name]
            row["mean_value_rmse"] = rmse(mean_train[j].expand_as(y), y)
            note = baseline_note(row["rmse"], row["mean_value_rmse"])
            baselines.append(f"{name}: {note}" if note else None)
    else:
        test, notes = held_out_metrics(pred, target, seed=run.config.seed)
        test["mean_value_rmse"] = rmse(mean_train.expand_as(target), target)
        baselines.append(baseline_note(test["rmse"], test["mean_value_rmse"]))
    for note in (
        *baselines,
        tensorboard_note() if run.config.tensorboard else None,
        skipped_note(run.data.skipped),
        missing_note((*run.data.train, *run.data.test)),
    ):
        if note is not None:
            notes.append(note)
    return test, notes


def diverged(run: Run, epoch: int, what: str) -> TrainingDivergedError:
    """Say what was measured and what likely caused it; epoch 0: the final verdict.

    Epoch 0 is the verdict on the trained model, reached by every rank together.
    """
    lr, dtype = run.config.lr, run.config.dtype
    initial = run.progress.initial_rmse
    values = _values(run)
    spread = float(torch.tensor(values, dtype=torch.float64).std(correction=0))
    if epoch:
        measured = f"in epoch {epoch} (a training batch): {what}"
        causes = [
            f"a learning rate too high (lower the learning rate (lr={lr:g}))",
            f"a network whose output overflows in {dtype} (try dtype=float64)",
        ]
    else:
        measured = f": {what}"
        causes = [f"a learning rate too high (lower the learning rate (lr={lr:g}))"]
    if spread > 0 and initial > DIVERGENCE_FACTOR * spread:
        causes.insert(
            0,
            f"values whose spread ({spread:.3g}) is far below the untrained model's error "
            f"(training RMSE {initial:.3g} before the first step), which no learning rate "
            "fixes: rescale the values or set normalize_targets=true",
        )
    return TrainingDivergedError(
        f"training diverged{' ' if epoch else ''}{measured}; likely causes: {'; or '.join(causes)}",
        same_on_every_rank=epoch == 0,
    )


def _values(run: Run) -> list[float]:
    """Return the value of every compound of the run: training, validation and test.

    Several targets: every value present, of all targets (for the divergence message).
    """
    every = _all_targets(run)
    return every[every.isfinite()].tolist()


def _all_targets(run: Run) -> Tensor:
    """Return the values of every compound of the run, ``(C,)`` or ``(C, d)``, float64, CPU."""
    compounds = (*run.data.train, *run.val, *run.data.test)
    return torch.stack([c.target.detach().double().cpu() for c in compounds])


def _chosen(run: Run) -> dict[str, str] | None:
    """Return what ``strategy=auto`` chose and why; ``None`` for a strategy named outright."""
    strategy = run.model.strategy
    if not isinstance(strategy, combframe.Auto) or strategy.chosen is None:
        return None
    return {"name": strategy.chosen.name, "reason": strategy.reason}


def _peak_bytes(run: Run) -> int | None:
    peak = int(run.ranks.max(float(run.progress.peak_bytes)))
    return peak if run.config.memory else None


def _validation(run: Run) -> dict[str, Any] | None:
    if not run.val:
        return None
    p = run.progress
    return {
        "compounds": len(run.val),
        "final_rmse": p.history[-1]["val_rmse"],
        "best_epoch": p.best_epoch,
        "best_rmse": p.best_rmse,
    }


def _versions() -> dict[str, str]:
    return {"combframe": combframe.__version__, "torch": torch.__version__}


def save_models(run: Run, folder: Path) -> None:
    """Write the final model and, with a validation split, the best one."""
    p = run.progress
    info = {
        "config": saved_config(run.config),
        "network": {"features": run.data.features, "kind": run.data.kind},
        "targets": list(run.data.targets),
        "versions": _versions(),
    }
    save_model(folder, "final", run.model.state_dict(), {**info, "epoch": p.epoch})
    if p.best_model is not None:
        best = {**info, "epoch": p.best_epoch, "val_rmse": p.best_rmse}
        save_model(folder, "best", p.best_model, best)
