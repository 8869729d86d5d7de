"""The ``combframe`` command line, run as a user runs it.

``train`` with the default config and ``check`` of the wrong plugin run as subprocesses;
the rest call ``main([...])`` in-process to stay fast.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import combframe
from combframe.app.cli import _parity_harness, main
from combframe.app.config import ConfigError, apply_overrides, load_config
from combframe.app.data import make_dataset
from combframe.app.metrics import pearson, rmse, spearman
from combframe.testing import isolated_registry, register_plugin

gradient_parity = _parity_harness()

ROOT = Path(__file__).resolve().parent.parent
WRONG_PLUGIN = Path(__file__).resolve().parent / "wrong_plugin"
TINY = ["epochs=1", "compounds=12", "poses_per_compound=3", "hidden=4"]


def run_cli(
    *args: str, cwd: Path, extra_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path is not None else [])
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "combframe", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_folder(parent: Path) -> Path:
    folders = [p for p in parent.iterdir() if p.is_dir()]
    assert len(folders) == 1, f"expected one run folder in {parent}, found {folders}"
    return folders[0]


# ---- train ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``combframe train`` with no arguments, in an empty folder."""
    cwd = tmp_path_factory.mktemp("default")
    proc = run_cli("train", cwd=cwd)
    return proc, cwd


def test_default_train_finishes_and_writes_its_run_folder(
    default_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, cwd = default_run
    assert proc.returncode == 0, proc.stderr
    for label in ("held-out", "RMSE", "Pearson", "Spearman", "time/epoch", "peak memory"):
        assert label in proc.stdout, f"{label!r} missing from the output:\n{proc.stdout}"
    assert "train max" not in proc.stderr, "a progress bar was drawn into a pipe"
    folder = one_folder(cwd / "runs")
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt",
        "config.yaml",
        "loss.png",
        "metrics.csv",
        "metrics.json",
        "model.json",
        "model.safetensors",
        "status.json",
    ]
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["combination"] == {"name": "max", "negate_preds": True, "pred_scale": 1000.0}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["history"]) == config["epochs"]
    for key in ("rmse", "pearson", "spearman"):
        assert math.isfinite(metrics["test"][key]), key
    assert metrics["test"]["pearson"] > 0.8
    assert metrics["time_per_epoch_s"] > 0
    assert metrics["peak_memory_bytes"] > 0


def test_smooth_min_beats_mean_on_held_out_rmse(
    default_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    proc, cwd = default_run
    assert proc.returncode == 0, proc.stderr
    smooth_min = json.loads((one_folder(cwd / "runs") / "metrics.json").read_text())
    status = main(["train", "--no-progress", "combination.name=mean", f"output_dir={tmp_path}"])
    assert status == 0
    mean = json.loads((one_folder(tmp_path) / "metrics.json").read_text())
    assert mean["combination"] == {"name": "mean"}
    # Fixed seed: about 0.29 against 0.43 kcal/mol; demand a clear margin.
    assert smooth_min["test"]["rmse"] < 0.85 * mean["test"]["rmse"], (
        smooth_min["test"],
        mean["test"],
    )


def test_compare_prints_one_table_and_writes_each_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--no-progress", "--compare", "max,mean,boltzmann", *TINY]
    assert main([*args, "val_fraction=0.25", f"output_dir={tmp_path}", "name=cmp"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[2:].startswith(("max(", "mean(", "boltz"))]
    assert len(rows) == 3, out
    assert sum(line.startswith("*") for line in rows) == 1
    top = tmp_path / "cmp"
    table = json.loads((top / "compare.json").read_text())
    assert [row["combination"]["name"] for row in table] == ["max", "mean", "boltzmann"]
    for row in table:
        assert (Path(row["run_dir"]) / "metrics.json").is_file()


def test_config_file_and_overrides_round_trip(tmp_path: Path) -> None:
    config = {
        "combination": {"name": "boltzmann", "kT": 0.5},
        "epochs": 1,
        "compounds": 12,
        "poses_per_compound": 3,
        "hidden": 4,
        "strategy": "stream",
        "output_dir": str(tmp_path / "a"),
        "name": "run",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--no-progress", "--config", str(path), "seed=3"]) == 0
    written = yaml.safe_load((tmp_path / "a" / "run" / "config.yaml").read_text())
    assert written["combination"] == {"name": "boltzmann", "kT": 0.5}
    assert written["seed"] == 3 and written["strategy"] == "stream"
    first = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())
    # The written config reproduces the run exactly (YAML this time).
    again = ["--config", str(tmp_path / "a" / "run" / "config.yaml"), "name=again"]
    assert main(["train", "--no-progress", *again]) == 0
    second = json.loads((tmp_path / "a" / "again" / "metrics.json").read_text())
    assert second["test"] == first["test"]
    untimed = [
        [{k: v for k, v in h.items() if k != "seconds"} for h in m["history"]]
        for m in (first, second)
    ]
    assert untimed[0] == untimed[1]


def test_recompute_strategy_trains_like_store(tmp_path: Path) -> None:
    runs = {}
    for strategy in ("store", "recompute"):
        status = main(
            [
                *("train", "--no-progress", *TINY, f"strategy={strategy}", "dtype=float64"),
                *(f"output_dir={tmp_path}", f"name={strategy}"),
            ]
        )
        assert status == 0
        runs[strategy] = json.loads((tmp_path / strategy / "metrics.json").read_text())
    assert runs["store"]["test"]["rmse"] == pytest.approx(
        runs["recompute"]["test"]["rmse"], rel=1e-9
    )


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["epochs=0"], "epochs"),
        (["lr=-1"], "lr"),
        (["bogus=1"], "bogus"),
        (["strategy=fast"], "strategy"),
        (["device=gpu"], "device"),
        (["combination.name=maxx"], "combination.name"),
        (["combination.pred_scale=-5"], "combination.pred_scale"),
        (["combination.name=mean", "combination.pred_scale=10"], "combination.pred_scale"),
        (["combination.kT=1"], "combination.kT"),
        (["epochs"], "key=value"),
        (["epochs.deep=1"], "epochs"),
        (["--compare", "max,nope"], "--compare combination.name=nope"),
        (["--compare", "strategy=store,fast"], "--compare strategy=fast"),
    ],
)
def test_bad_train_input_exits_2_naming_the_field(
    args: list[str], field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--no-progress", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("combframe train: error: ")
    assert field in err, err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a rejected config must not start a run"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("epochs: 2\nunknown_key: 1\n", "unknown_key"),
        ('{"combination": {"name": "max", "pred_scale": "sharp"}}', "combination.pred_scale"),
        ("combination: {kT: 1}\n", "combination.name"),
        ("- a list\n", "mapping"),
        ("epochs: [1,\n", "not valid YAML"),
    ],
)
def test_bad_config_file_exits_2_naming_the_field(
    text: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "device=cuda", f"output_dir={tmp_path}"]) == 2
    assert "device" in capsys.readouterr().err


def test_diverging_training_exits_1_with_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--no-progress", *TINY, "lr=1e30", f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged" in err and "lr=1e+30" in err, err


def test_overrides_walk_dotted_paths_and_reset_on_a_new_name() -> None:
    base = {"combination": {"name": "max", "pred_scale": 3.0}, "epochs": 2}
    out = apply_overrides(base, ["epochs=5", "lr=1e-3", "combination.pred_scale=7"])
    assert out == {"combination": {"name": "max", "pred_scale": 7.0}, "epochs": 5, "lr": 1e-3}
    assert base["epochs"] == 2, "overrides must not change their input"
    out = apply_overrides(base, ["combination.name=boltzmann", "combination.kT=0.5"])
    assert out["combination"] == {"name": "boltzmann", "kT": 0.5}
    assert apply_overrides({}, ["name=null", "plot=false"]) == {"name": None, "plot": False}
    plain = apply_overrides({}, ["name=nan", "a=inf", "b=1e3", "c=-2.5E-2", "d=x=y", "e=[1, 2]"])
    assert plain == {"name": "nan", "a": "inf", "b": 1000.0, "c": -0.025, "d": "x=y", "e": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base, ["=3"])


def test_load_config_defaults_and_override_types() -> None:
    config = load_config(None, ["epochs=3", "combination.pred_scale=10"])
    assert config.epochs == 3
    assert config.combination.model_dump() == {
        "name": "max",
        "negate_preds": True,
        "pred_scale": 10.0,
    }


# ---- check ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max", "mean", "boltzmann"])
def test_check_passes_for_shipped_combinations(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", name, "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert f"PASS {name}" in out
    for strategy in ("store", "recompute", "stream"):
        assert f"ok   {strategy}" in out, f"{strategy} not checked for {name}:\n{out}"


def test_check_takes_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check", "max", "negate_preds=false", "--poses", "3", "pred_scale=3"]
    assert main(args) == 0
    assert "max(negate_preds=False, pred_scale=3.0)" in capsys.readouterr().out


def test_check_runs_vector_outputs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def harness(*args: Any, **kw: Any) -> Any:
        asked.append(kw["outputs"])
        return gradient_parity(*args, **kw)

    monkeypatch.setattr("combframe.app.cli._parity_harness", lambda: harness)
    assert main(["check", "boltzmann", "--outputs", "3", "--seeds", "0", "--poses", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "3 value(s) per pose" in out and "PASS boltzmann" in out
    assert main(["check", "gated_attention", "dim=2", "hidden=3", "--seeds", "0"]) == 0
    assert main(["check", "gated_attention", "hidden=3", "--outputs", "4", "--seeds", "0"]) == 0
    assert asked == [3, 2, 4]  # a pooling combination: its dim, or --outputs without dim=
    assert "gated_attention(dim=4, " in capsys.readouterr().out


def test_check_fails_for_the_wrong_plugin(tmp_path: Path) -> None:
    proc = run_cli("check", "wrong_weights", cwd=tmp_path, extra_path=WRONG_PLUGIN)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL wrong_weights" in proc.stdout
    assert "FAIL mtenn      combined" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_list_shows_third_party_plugins_and_load_errors(tmp_path: Path) -> None:
    proc = run_cli("list", "--json", cwd=tmp_path, extra_path=WRONG_PLUGIN)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in data["combinations"]}
    wrong = by_name["wrong_weights"]
    assert (wrong["distribution"], wrong["version"]) == ("combframe-wrong-plugin", "0.1.0")
    assert wrong["supports_stream"] is False
    [error] = data["errors"]
    assert error["plugin"] == "broken"
    assert error["distribution"] == "combframe-broken-plugin"
    assert "combframe_broken_missing_module" in error["exception"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["check", "nope"], "unknown combination 'nope'"),
        (["check", "max", "pred_scale=-1"], "pred_scale"),
        (["check", "max", "sharpness=2"], "sharpness"),
        (["check", "max", "pred_scale"], "key=value"),
        (["check", "max", "--poses", "0"], "--poses"),
        (["check", "max", "--poses", "x"], "--poses"),
        (["check", "max", "--outputs", "0"], "--outputs"),
        (["check", "gated_attention", "dim=4", "--outputs", "3"], "dim=4"),
        (["check", "gated_attention"], "dim: Field required: give dim=<values per pose>"),
        (["check"], "NAME"),
        (["frobnicate"], "frobnicate"),
        (["check", "max", "--fast"], "--fast"),
        (["list", "extra=1"], "extra=1"),
    ],
)
def test_check_usage_errors_exit_2(
    args: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err


def test_parity_records_errors_when_asked() -> None:
    class BadShape(combframe.Combination):
        name = "bad_shape"

        def value(self, preds: torch.Tensor) -> torch.Tensor:
            return preds.mean()

        def pose_weights(self, preds: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
            return torch.ones(preds.numel() + 1, dtype=preds.dtype)

    comb = BadShape()
    result = gradient_parity(comb, n_poses=(2,), seeds=(0,), on_error="record")
    assert not result.passed
    assert result.errors and all("bad_shape" not in e or ":" in e for e in result.errors)
    assert any(e.startswith("mtenn/combined/N=2: ") for e in result.errors), result.errors
    with pytest.raises(Exception):  # noqa: B017 - whatever the core raises, it propagates
        gradient_parity(comb, n_poses=(2,), seeds=(0,))


class PlainMean(combframe.Combination):
    """A mean without the streaming methods, registered in-process."""

    name = "plain_mean"

    def value(self, preds: torch.Tensor) -> torch.Tensor:
        return preds.mean()


class RaisingWeights(PlainMean):
    name = "raising_weights"

    def pose_weights(self, preds: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("pose weights exploded")


def test_in_process_plugins_train_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with isolated_registry():
        register_plugin(PlainMean)
        register_plugin(RaisingWeights)
        assert main(["check", "plain_mean", "--seeds", "0", "--poses", "3"]) == 0
        out = capsys.readouterr().out
        assert "PASS plain_mean" in out and "skip stream" in out
        assert main(["check", "raising_weights", "--seeds", "0", "--poses", "3"]) == 1
        out = capsys.readouterr().out
        assert "RuntimeError: pose weights exploded" in out
        assert "FAIL raising_weights" in out and "raised" in out
        args = ["train", *TINY, f"output_dir={tmp_path}", "combination.name=plain_mean"]
        assert main([*args, "strategy=stream"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("combframe train: error: strategy: ") and "plain_mean" in err
        compare = ["train", "--compare", "max,plain_mean", *TINY, f"output_dir={tmp_path}"]
        assert main([*compare, "strategy=stream"]) == 2
        assert "plain_mean" in capsys.readouterr().err
        assert not any(tmp_path.iterdir()), "compare must refuse before the first run"
        assert main([*args, "--no-progress", "strategy=recompute", "name=r"]) == 0
    assert (tmp_path / "r" / "metrics.json").is_file()


# ---- list, schema, entry points ---------------------------------------------------------


def test_list_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {c["name"]: c for c in data["combinations"]}
    assert {"max", "mean", "boltzmann"} <= set(by_name)
    assert [p["name"] for p in by_name["max"]["parameters"]] == ["negate_preds", "pred_scale"]
    assert by_name["boltzmann"]["distribution"] == "combframe"
    assert isinstance(data["errors"], list)


def test_list_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "pred_scale (float, default 1000.0, > 0)" in out
    assert "kT" in out


def test_schema_is_the_combination_config_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert schema == combframe.combination_config_schema()
    text = json.dumps(schema)
    for name in ("max", "mean", "boltzmann"):
        assert f'"{name}"' in text


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main([]) == 2
    assert "choose a command" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("combframe ")


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = shutil.which("combframe")
    if script is None:
        pytest.skip("the combframe console script is not on PATH (package not installed)")
    proc = subprocess.run(
        [script, "list", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "max" in {c["name"] for c in json.loads(proc.stdout)["combinations"]}


# ---- dataset and metrics ----------------------------------------------------------------


def test_dataset_is_deterministic_and_set_by_the_best_pose() -> None:
    a = make_dataset(n_compounds=20, poses_per_compound=4, seed=5, noise=0.0)
    b = make_dataset(n_compounds=20, poses_per_compound=4, seed=5, noise=0.0)
    c = make_dataset(n_compounds=20, poses_per_compound=4, seed=6, noise=0.0)
    assert len(a.test) == 5 and len(a.train) == 15
    for x, y in zip(a.train + a.test, b.train + b.test, strict=True):
        assert torch.equal(x.poses, y.poses) and torch.equal(x.target, y.target)
        assert x.poses.shape == (4, 1, 8)
        assert torch.equal(x.target, x.pose_energies.min())
    assert not torch.equal(a.train[0].poses, c.train[0].poses)
    with pytest.raises(ValueError, match="test_fraction"):
        make_dataset(test_fraction=1.0)


finite = st.floats(-1e3, 1e3, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=30))
def test_metrics_match_their_definitions(pairs: list[tuple[float, float]]) -> None:
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    target = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    assert rmse(pred, target) == pytest.approx(
        math.sqrt(sum((p - t) ** 2 for p, t in pairs) / len(pairs)), rel=1e-9, abs=1e-9
    )
    r = pearson(pred, target)
    if pred.std() > 1e-6 and target.std() > 1e-6:
        want = torch.corrcoef(torch.stack([pred, target]))[0, 1].item()
        assert r == pytest.approx(want, abs=1e-9)
        # Spearman is Pearson of ranks: scaling (exact in floating point) keeps it,
        # reversing the order flips its sign.
        rho = spearman(pred, target)
        assert spearman(4.0 * pred, target) == pytest.approx(rho, abs=1e-12)
        assert spearman(-pred, target) == pytest.approx(-rho, abs=1e-12)
        assert spearman(pred, pred) == pytest.approx(1.0)


def test_spearman_averages_ties() -> None:
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])
    y = torch.tensor([1.0, 2.5, 2.5, 4.0])
    assert spearman(x, y) == pytest.approx(1.0)
    assert spearman(x, -y) == pytest.approx(-1.0)
    assert math.isnan(pearson(torch.ones(3), torch.arange(3.0)))
