"""The command line as a new user meets it: messages, --compare, options, odd input."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from combframe.app.cli import main
from combframe.app.config import load_config
from combframe.app.predict import load, predict
from combframe.app.train import load_data, train

TINY = ["--no-progress", "compounds=24", "poses_per_compound=3", "hidden=4", "plot=false"]


def _compounds_file(path: Path, values: list[float], features: int = 4) -> Path:
    rng = random.Random(0)
    compounds = [
        {
            "name": f"c{i}",
            "value": v,
            "poses": [[rng.gauss(0, 1) for _ in range(features)] for _ in range(3)],
        }
        for i, v in enumerate(values)
    ]
    path.write_text(json.dumps({"compounds": compounds}))
    return path


def test_divergence_from_a_tiny_spread_names_the_data_not_the_learning_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to advise a lower learning rate, which fails at any lr here."""
    rng = random.Random(1)
    data = _compounds_file(tmp_path / "d.json", [-8 + 1e-4 * rng.random() for _ in range(20)])
    args = ["train", *TINY, f"data={data}", "epochs=1", "lr=1e-6", f"output_dir={tmp_path}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the held-out RMSE" in err and "times the spread of the values" in err
    assert "likely causes: values whose spread" in err and "no learning rate fixes" in err
    assert "before the first step" in err and "normalize_targets=true" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "epochs=1,2", "epochs=3"], "--compare varies epochs, and the override"),
        (["--compare", "max,mean", "combination.name=max"], "--compare varies combination.name"),
        (["--compare", "epochs=1,2", "--compare", "seed=1,2"], "--compare is given 2 times"),
        (["--compare", "epochs=1,2", "--seeds", "2"], "--seeds and --compare cannot be combined"),
    ],
)
def test_compare_refuses_what_it_would_silently_drop(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *TINY, *args]) == 2
    assert message in capsys.readouterr().err


def test_compare_chooses_on_validation_and_reports_test_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", *TINY, "epochs=2", "--compare", "max,mean", "val_fraction=0.25"]
    assert main([*args, f"output_dir={tmp_path}", "name=c"]) == 0
    out = capsys.readouterr().out
    assert "val RMSE" in out and "* lowest validation RMSE" in out
    table = json.loads((tmp_path / "c" / "compare.json").read_text())
    val = [
        json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["validation"]["best_rmse"]
        for r in table
    ]
    starred = [line for line in out.splitlines() if line.startswith("* ") and "  " in line]
    assert len(starred) == 1
    assert ("max(" in starred[0]) == (val[0] <= val[1])
    assert (
        main(["train", *TINY, "epochs=1", "--compare", "max,mean", f"output_dir={tmp_path}"]) == 0
    )
    assert "no run is chosen: set val_fraction" in capsys.readouterr().out


def test_did_you_mean_for_keys_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "epoch=3"]) == 2
    assert "did you mean 'epochs'?" in capsys.readouterr().err
    assert main(["train", "combination.name=boltzmann", "combination.kt=0.5"]) == 2
    assert "did you mean 'kT'?" in capsys.readouterr().err


def test_a_bare_combination_name_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("combination: mean\nepochs: 1\n")
    assert load_config(path).combination.name == "mean"
    assert load_config(path, ["combination=boltzmann"]).combination.name == "boltzmann"


def test_values_that_overflow_the_training_dtype_name_the_compound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _compounds_file(tmp_path / "d.json", [-8.0, -7.0, -6.0])
    raw = json.loads(data.read_text())
    raw["compounds"][1]["poses"][0][2] = 1e308
    data.write_text(json.dumps(raw))
    assert main(["train", *TINY, f"data={data}"]) == 2
    err = capsys.readouterr().err
    assert "compounds[1] ('c1'): pose 0 feature 2 is 1e+308" in err
    assert "not finite in float32 (the training dtype)" in err
    config = load_config(None, [f"data={data}", "dtype=float64"])
    assert len(load_data(config, for_prediction=True).train) == 3


def test_deeply_nested_json_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["train", f"data={deep}"]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    assert main(["train", "--config", str(deep)]) == 2
    assert "nested too deeply" in capsys.readouterr().err


def test_chunk_size_and_strategy_options_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = {}
    for extra in (
        ["chunk_size=1"],
        ["chunk_size=3", "strategy=recompute", "strategy_options.check=false"],
    ):
        args = ["train", *TINY, "epochs=2", "dtype=float64", *extra, f"output_dir={tmp_path}"]
        assert main([*args, f"name={extra[0]}"]) == 0
        runs[extra[0]] = json.loads((tmp_path / extra[0] / "metrics.json").read_text())
    a, b = runs["chunk_size=1"], runs["chunk_size=3"]
    assert b["test"]["rmse"] == pytest.approx(a["test"]["rmse"], rel=1e-10)
    assert load(tmp_path / "chunk_size=3").chunk_size == 3
    assert main(["train", *TINY, "strategy_options.foo=1"]) == 2
    assert "not options of the 'auto' strategy" in capsys.readouterr().err


def test_normalised_targets_travel_with_the_saved_model(tmp_path: Path) -> None:
    args = ["train", *TINY, "epochs=2", "dtype=float64", "normalize_targets=true"]
    assert main([*args, f"output_dir={tmp_path}", "name=n"]) == 0
    metrics = json.loads((tmp_path / "n" / "metrics.json").read_text())
    model = load(tmp_path / "n")
    config = load_config(tmp_path / "n" / "config.yaml")
    test = load_data(config).test
    pred = predict([model], test).combined
    target = torch.stack([c.target for c in test])
    assert float(((pred - target) ** 2).mean().sqrt()) == pytest.approx(
        metrics["test"]["rmse"], rel=1e-12
    )
    assert float(model.model.scale) > 0 and float(model.model.shift) < 0


def test_memory_can_be_turned_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["train", *TINY, "epochs=1", "memory=false", f"output_dir={tmp_path}", "name=m"]) == 0
    )
    assert "not measured (memory=false)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["peak_memory_bytes"] is None


def test_one_line_per_epoch_where_no_bar_can_be_drawn() -> None:
    stream = io.StringIO()
    config = load_config(None, ["compounds=24", "epochs=3", "hidden=4", "val_fraction=0.25"])
    train(config, progress=True, write=False, stream=stream)
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", f"{e}/3"] for e in (1, 2, 3)]
    assert all("train_rmse" in line and "val_rmse" in line for line in lines)
