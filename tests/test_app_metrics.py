"""Held-out metrics against scipy, bootstrap intervals, per-epoch logs, early stopping."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from combframe.app.cli import main
from combframe.app.metrics import (
    bootstrap_intervals,
    held_out_metrics,
    kendall,
    mae,
    pearson,
    rmse,
    spearman,
)

TINY = ["--no-progress", "compounds=24", "poses_per_compound=3", "hidden=4", "plot=false"]

# Values on a coarse grid, so that ties (which Spearman and Kendall must handle) are common.
_values = st.lists(st.integers(-6, 6).map(lambda v: v / 2), min_size=2, max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_metrics_match_scipy(data: st.DataObject) -> None:
    x = data.draw(_values)
    y = data.draw(
        st.lists(st.integers(-6, 6).map(lambda v: v / 2), min_size=len(x), max_size=len(x))
    )
    pred, target = torch.tensor(x), torch.tensor(y)
    assert mae(pred, target) == pytest.approx(float(np.mean(np.abs(np.subtract(x, y)))))
    assert rmse(pred, target) == pytest.approx(math.sqrt(float(np.mean(np.subtract(x, y) ** 2))))
    constant = len(set(x)) < 2 or len(set(y)) < 2
    for ours, theirs in (
        (pearson, lambda: stats.pearsonr(x, y).statistic),
        (spearman, lambda: stats.spearmanr(x, y).statistic),
        (kendall, lambda: stats.kendalltau(x, y).statistic),
    ):
        value = ours(pred, target)
        if constant:
            assert math.isnan(value)
        else:
            assert value == pytest.approx(float(theirs()), abs=1e-12), ours.__name__


def test_kendall_in_blocks_matches_scipy_on_a_larger_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from combframe.app import metrics

    monkeypatch.setattr(metrics, "_BLOCK", 1000)  # force many blocks
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=300), gen.normal(size=300).round(1)
    assert kendall(torch.tensor(x), torch.tensor(y)) == pytest.approx(
        float(stats.kendalltau(x, y).statistic), abs=1e-12
    )


def test_bootstrap_intervals_are_the_percentiles_of_resampled_metrics() -> None:
    gen = np.random.default_rng(1)
    target = gen.normal(size=40)
    pred = target + gen.normal(scale=0.5, size=40)
    ci = bootstrap_intervals(torch.tensor(pred), torch.tensor(target), samples=500, seed=3)
    index = torch.randint(40, (500, 40), generator=torch.Generator().manual_seed(3)).numpy()
    rmses = np.sqrt(((pred[index] - target[index]) ** 2).mean(axis=1))
    kendalls = [stats.kendalltau(pred[i], target[i]).statistic for i in index]
    assert ci["rmse"] == pytest.approx(list(np.quantile(rmses, [0.025, 0.975])), rel=1e-12)
    assert ci["kendall"] == pytest.approx(list(np.quantile(kendalls, [0.025, 0.975])), rel=1e-9)
    point, _ = held_out_metrics(torch.tensor(pred), torch.tensor(target))
    for name in ("mae", "rmse", "pearson", "spearman", "kendall"):
        low, high = point["ci95"][name]
        assert low <= point[name] <= high, name


def test_one_compound_has_no_interval() -> None:
    point, notes = held_out_metrics(torch.tensor([1.0]), torch.tensor([2.0]))
    assert point["ci95"]["rmse"] is None and point["kendall"] is None
    assert notes and notes[0].startswith("Pearson, Spearman and Kendall are n/a")


def test_metrics_json_and_csv_hold_every_metric_and_epoch(tmp_path: Path) -> None:
    args = ["train", *TINY, "epochs=3", "val_fraction=0.25", f"output_dir={tmp_path}", "name=m"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    for name in ("mae", "rmse", "pearson", "spearman", "kendall"):
        assert math.isfinite(metrics["test"][name]), name
        low, high = metrics["test"]["ci95"][name]
        assert low <= high
    with open(tmp_path / "m" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == ["epoch", "train_rmse", "val_rmse", "test_rmse", "lr", "seconds"]
    assert metrics["validation"]["compounds"] == 4  # a quarter of 18
    assert 1 <= metrics["validation"]["best_epoch"] <= 3


def test_early_stopping_on_validation_rmse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate too small to move the weights: the validation RMSE never improves.

    The summary used to say neither that the run stopped early nor which epoch was best,
    nor which model its held-out metrics are of.
    """
    args = ["train", *TINY, "epochs=20", "lr=1e-12", "val_fraction=0.25", "patience=2"]
    assert main([*args, f"output_dir={tmp_path}", "name=e"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["stopped_early"] is True
    assert metrics["epochs_trained"] == 3 and len(metrics["history"]) == 3
    assert metrics["validation"]["best_epoch"] == 1
    assert metrics["validation"]["final_rmse"] == metrics["history"][-1]["val_rmse"]
    out = capsys.readouterr().out
    assert "stopped early at epoch 3: no lower validation RMSE in the 2 epochs after epoch 1" in out
    assert "at epoch 3: the run's model (model.safetensors), whose held-out metrics" in out
    assert "at epoch 1 (best.safetensors, predict --best)" in out
    saved = json.loads((tmp_path / "e" / "model.json").read_text())
    assert saved["epoch"] == 3


def test_intervals_over_few_held_out_compounds_say_they_are_not_meaningful(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 held-out compounds printed "Pearson 1.000 ... 95% CI 1.000 to 1.000" and no note."""
    tiny = [a for a in TINY if not a.startswith("compounds=")]
    args = ["train", *tiny, "compounds=8", "epochs=1", f"output_dir={tmp_path}", "name=few"]
    assert main(args) == 0
    assert "the 95% intervals are not meaningful: only 2 held-out compounds" in (
        capsys.readouterr().err
    )
    flat = held_out_metrics(torch.arange(12.0), torch.arange(12.0))[1]
    assert len(flat) == 1 and flat[0].startswith("the 95% intervals of mae, rmse")
    assert flat[0].endswith(
        "every bootstrap resample gave the same value (an interval of zero width)"
    )
    digits = torch.tensor([3.0, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    assert held_out_metrics(torch.arange(12.0), digits)[1] == []


def test_patience_without_a_validation_split_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", *TINY, "patience=2"]) == 2
    assert "set val_fraction" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedules(schedule: str, tmp_path: Path) -> None:
    args = ["train", *TINY, "epochs=4", "batch_size=18", "lr=0.01", f"schedule={schedule}"]
    assert main([*args, f"output_dir={tmp_path}", "name=s"]) == 0
    lrs = [h["lr"] for h in json.loads((tmp_path / "s" / "metrics.json").read_text())["history"]]
    expected = {
        "cosine": [0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (1, 2, 3, 4)],
        "linear": [0.0075, 0.005, 0.0025, 0.0],
        "constant": [0.01] * 4,
    }[schedule]
    assert lrs == pytest.approx(expected, abs=1e-12)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed"
)
def test_tensorboard_without_tensorboard_is_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *TINY, "epochs=1", "tensorboard=true", f"output_dir={tmp_path}"]) == 0
    assert "no TensorBoard log: tensorboard is not installed" in capsys.readouterr().err
