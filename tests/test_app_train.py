"""``combframe train``: divergence, per-run step memory and undefined metrics."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from combframe.app.cli import main
from combframe.app.config import ConfigError, load_config
from combframe.app.metrics import DIVERGENCE_FACTOR, divergence, undefined_correlation
from combframe.app.train import train

SMALL = ["compounds=40", "epochs=2", "--no-progress"]


# ---- divergence -------------------------------------------------------------------------


def test_a_huge_learning_rate_is_reported_as_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lr=100 used to end with exit 0, a held-out RMSE of 1e5 kcal/mol and no word."""
    assert main(["train", *SMALL, "lr=100", f"output_dir={tmp_path}", "name=big"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1, err
    assert err.startswith("combframe train: training diverged: "), err
    assert "times the spread of the values" in err
    assert "lower the learning rate (lr=100)" in err
    assert "held-out" not in captured.out, "no metrics printed for a diverged run"
    assert json.loads((tmp_path / "big" / "status.json").read_text())["state"] == "failed"


def test_divergence_rule() -> None:
    values = [-9.0, -8.0, -7.0, -8.0]  # standard deviation 0.707
    spread = math.sqrt(0.5)
    assert divergence(0.3, 0.5, values) is None
    assert divergence(0.3, 0.99 * DIVERGENCE_FACTOR * spread, values) is None
    message = divergence(0.3, 1.01 * DIVERGENCE_FACTOR * spread, values)
    assert message is not None and message.startswith("the held-out RMSE")
    message = divergence(1e6, 0.5, values)
    assert message is not None and message.startswith("the training RMSE 1e+06")
    assert divergence(math.nan, 0.5, values) == "the training RMSE is nan"
    assert divergence(0.1, 50.0, [-8.0, -8.0]) is None, "no spread: only non-finite counts"


# ---- memory -----------------------------------------------------------------------------


def test_step_memory_differs_between_strategies_and_does_not_accumulate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be the process's peak RSS: the same ~670 MiB for every strategy."""
    args = ["train", "--compare", "strategy=store,recompute,stream,store", "epochs=1"]
    assert main([*args, "compounds=24", "--no-progress", f"output_dir={tmp_path}", "name=m"]) == 0
    out = capsys.readouterr().out
    assert "step memory" in out and "CPU tensors of a training step (torch profiler)" in out
    table = json.loads((tmp_path / "m" / "compare.json").read_text())
    assert [row["run"] for row in table] == [
        "strategy=store",
        "strategy=recompute",
        "strategy=stream",
        "strategy=store",
    ]
    peaks = []
    for row in table:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics["peak_memory_kind"] == (
            "CPU tensors of a training step (torch profiler), the largest of steps "
            "1, 2, 4, 8, ... of the run"
        )
        assert metrics["process_peak_rss_mb"] > 0  # kept, and labelled as what it is
        peaks.append(metrics["peak_memory_bytes"])
    store, recompute, stream, store_again = peaks
    # store holds 8 compounds x 8 poses x 1377 float32 per-pose gradients (344 KiB).
    assert store > 2 * recompute and store > 2 * stream, peaks
    assert store_again == store, "the same run measures the same, first or last"
    assert 0 < recompute < 2**20


# ---- undefined metrics ------------------------------------------------------------------


def test_one_held_out_compound_prints_na_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compounds=2 used to print Pearson nan without a word."""
    args = ["train", "compounds=2", "epochs=1", "--no-progress", f"output_dir={tmp_path}"]
    assert main([*args, "name=two"]) == 0
    captured = capsys.readouterr()
    assert "Pearson n/a   Spearman n/a   Kendall n/a   (1 compound)" in captured.out
    assert "nan" not in captured.out
    assert "note: Pearson, Spearman and Kendall are n/a: only 1 held-out compound" in captured.err
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["test"]["pearson"] is None and metrics["test"]["spearman"] is None
    assert math.isfinite(metrics["test"]["rmse"])


def test_reasons_for_undefined_correlations() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    assert undefined_correlation(x, x) is None
    assert "only 1 held-out compound" in str(undefined_correlation(x[:1], x[:1]))
    assert "same value for every held-out compound" in str(undefined_correlation(torch.ones(3), x))
    assert "every held-out compound has the same value" in str(
        undefined_correlation(x, torch.ones(3))
    )


def test_the_documented_config_file_trains_without_an_alarm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The YAML example of docs/cli.md: no divergence, no note."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    [block] = re.findall(r"```yaml\n(.*?)```", page, re.DOTALL)
    path = tmp_path / "run.yaml"
    path.write_text(block)
    args = ["train", "--config", str(path), "--no-progress", f"output_dir={tmp_path}"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    assert "boltzmann(kT=0.6)" in captured.out and "recompute" in captured.out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_the_progress_bar_is_drawn_on_a_terminal_or_says_how_to_get_it(
    tqdm_installed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from combframe.app.config import load_config
    from combframe.app.train import train

    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    terminal = _Terminal()
    train(load_config(None, ["compounds=12", "epochs=1"]), write=False, stream=terminal)
    shown = terminal.getvalue()
    if tqdm_installed:
        assert "train max" in shown, shown
    else:
        assert "pip install 'combframe[progress]'" in shown, shown


@pytest.mark.parametrize(
    ("memory_steps", "profiled_steps"),
    [("first", [1]), ("sampled", [1, 2, 4, 8]), ("every", list(range(1, 10)))],
)
def test_cpu_memory_is_the_largest_over_the_steps_memory_steps_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_steps: str, profiled_steps: list[int]
) -> None:
    """The profiler covers a logarithmic number of steps by default, not the first alone."""
    import combframe.app.train as train_module

    seen: list[int] = []
    real = train_module.measure_step

    def counting(step: Any) -> tuple[Any, int]:
        result, _ = real(step)
        seen.append(len(seen) + 1)
        return result, 1000 * len(seen)  # a larger peak each time: the largest is kept

    monkeypatch.setattr(train_module, "measure_step", counting)
    # 24 compounds, 6 held out, batches of 6: 3 steps an epoch, 9 steps in 3 epochs
    args = ["train", "epochs=3", "compounds=24", "batch_size=6", "--no-progress"]
    args += [f"memory_steps={memory_steps}", f"output_dir={tmp_path}", "name=m"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert len(seen) == len(profiled_steps)
    assert metrics["peak_memory_bytes"] == 1000 * len(profiled_steps)
    assert metrics["peak_memory_kind"].startswith("CPU tensors of a training step (torch profiler)")


def test_profiled_steps_are_powers_of_two_when_sampled() -> None:
    from combframe.app.memory import profiled

    assert [n for n in range(1, 70) if profiled(n, "sampled")] == [1, 2, 4, 8, 16, 32, 64]
    assert [n for n in range(1, 70) if profiled(n, "first")] == [1]
    assert all(profiled(n, "every") for n in range(1, 70))


class TwoValues(torch.nn.Module):
    """A user's network (by import path) returning two values per pose."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(pose)
        return out


def test_a_network_of_two_values_per_pose_is_refused_not_broadcast() -> None:
    """Two training compounds of two values each: (2, 2) - (2,) would broadcast silently."""
    keys = ["compounds=4", "features=3", "test_fraction=0.5", "val_fraction=0", "epochs=1"]
    config = load_config(None, [*keys, "model.name=tests.test_app_train:TwoValues"])
    says = r"model.name '\S+TwoValues': with one target the network must return shape \(b,\)"
    with pytest.raises(ConfigError, match=says + r".* shape \(2,\) per compound"):
        train(config, progress=False, write=False)
