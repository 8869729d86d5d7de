"""Saved models: load them back anywhere, refuse tampered weights, predict, ensembles."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import combframe.app
from combframe.app.checkpoint import CheckpointError
from combframe.app.cli import main
from combframe.app.config import TrainConfig
from combframe.app.metrics import rmse
from combframe.app.predict import load, predict
from combframe.app.train import load_data
from combframe.errors import CombframeError

TINY = [
    "--no-progress",
    "compounds=16",
    "poses_per_compound=3",
    "hidden=4",
    "epochs=2",
    "batch_size=4",
    "plot=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float64 run with a validation split, and a --seeds 2 pair of float32 runs."""
    out = tmp_path_factory.mktemp("runs")
    args = ["train", *TINY, f"output_dir={out}"]
    assert main([*args, "dtype=float64", "val_fraction=0.25", "name=one"]) == 0
    assert main([*args, "--seeds", "2", "combination.name=mean", "name=pair"]) == 0
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_loaded_model_predicts_what_the_run_measured_under_any_default_dtype(
    runs: Path,
) -> None:
    folder = runs / "one"
    metrics = json.loads((folder / "metrics.json").read_text())
    config = TrainConfig.model_validate(json.loads((folder / "model.json").read_text())["config"])
    test = load_data(config).test
    outputs = []
    previous = torch.get_default_dtype()
    try:
        for default in (torch.float32, torch.float64, torch.float32):
            torch.set_default_dtype(default)
            model = combframe.app.load(folder)
            assert next(model.parameters()).dtype == torch.float64
            outputs.append(predict([model], test).combined)
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    target = torch.stack([c.target for c in test])
    assert rmse(outputs[0], target) == metrics["test"]["rmse"]


def test_the_combination_travels_with_the_model(runs: Path) -> None:
    model = load(runs / "pair" / "seed-0")
    assert model.combination.to_config() == {"name": "mean"}
    best = load(runs / "one", which="best")
    assert best.combination.to_config() == {
        "name": "max",
        "negate_preds": True,
        "pred_scale": 1000.0,
    }
    meta = json.loads((runs / "one" / "best.json").read_text())
    assert meta["epoch"] >= 1 and math.isfinite(meta["val_rmse"])
    assert set(meta["versions"]) == {"combframe", "torch"}


def test_a_config_edited_to_another_combination_is_refused(runs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((runs / "one" / "model.safetensors").read_bytes())
    meta = json.loads((runs / "one" / "model.json").read_text())
    assert meta["extra_state"]["combination._extra_state"]["params"]["pred_scale"] == 1000.0
    meta["config"]["combination"]["pred_scale"] = 10.0
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the model its config describes"):
        load(folder)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_or_truncated_weights_are_refused_by_their_hash(
    damage: str, runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("model.json", "model.safetensors"):
        (folder / name).write_bytes((runs / "one" / name).read_bytes())
    data = bytearray((folder / "model.safetensors").read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of one weight
    else:
        del data[len(data) // 2 :]
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load(folder)
    assert main(["predict", str(folder), "-o", str(tmp_path / "p.csv")]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def test_predict_writes_compounds_and_poses_with_their_weights(runs: Path, tmp_path: Path) -> None:
    out, poses = tmp_path / "p.csv", tmp_path / "poses.csv"
    assert main(["predict", str(runs / "one"), "-o", str(out), "--poses", str(poses)]) == 0
    rows = _rows(out)
    assert len(rows) == 16 and list(rows[0]) == ["index", "name", "prediction", "target"]
    pose_rows = _rows(poses)
    assert len(pose_rows) == 16 * 3
    for i, row in enumerate(rows):
        mine = [p for p in pose_rows if int(p["index"]) == i]
        weights = [float(p["weight"]) for p in mine]
        # The smooth minimum: its weights sum to 1 and pick the lowest prediction.
        assert sum(weights) == pytest.approx(1.0)
        best = min(mine, key=lambda p: float(p["prediction"]))
        assert float(best["weight"]) == max(weights)
        assert float(row["prediction"]) == pytest.approx(float(best["prediction"]), abs=1e-2)


def test_pose_weights_are_the_gradient_of_the_combination(runs: Path) -> None:
    model = load(runs / "one")
    compounds = load_data(model_config(runs / "one"), for_prediction=True).train[:3]
    result = predict([model], compounds)
    for c, compound in enumerate(compounds):
        poses = compound.poses.clone()
        y = model.model(poses.squeeze(1)).detach().requires_grad_(True)
        (expected,) = torch.autograd.grad(model.combination.value(y), y)
        assert torch.allclose(result.weights[result.index == c], expected.double())


def model_config(folder: Path) -> TrainConfig:
    return TrainConfig.model_validate(json.loads((folder / "model.json").read_text())["config"])


def _new_compounds(tmp_path: Path, values: bool = False) -> Path:
    gen = torch.Generator().manual_seed(5)
    compounds = []
    for i in range(4):
        poses = torch.randn(2, 8, generator=gen, dtype=torch.float64).tolist()
        compounds.append(
            {"name": f"new-{i}", "poses": poses, **({"value": -8.0} if values else {})}
        )
    path = tmp_path / "new.json"
    path.write_text(json.dumps({"compounds": compounds}))
    return path


def test_targets_are_written_as_read_and_empty_where_a_compound_has_none(
    runs: Path, tmp_path: Path
) -> None:
    path = _new_compounds(tmp_path)
    data = json.loads(path.read_text())
    data["compounds"][0]["value"], data["compounds"][2]["value"] = -6.1, -7
    path.write_text(json.dumps(data))
    out = tmp_path / "p.csv"
    for run, digits in ((runs / "pair" / "seed-0", "-6.1"), (runs / "one", "-6.1")):
        assert main(["predict", str(run), f"data={path}", "-o", str(out)]) == 0
        assert [r["target"] for r in _rows(out)] == [digits, "", "-7.0", ""]


def test_the_built_in_set_names_its_compounds(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs / "pair" / "seed-0"), "-o", str(out)]) == 0
    names = [r["name"] for r in _rows(out)]
    assert all(names) and len(set(names)) == len(names)


def test_an_ensemble_gives_the_mean_and_std_of_its_members(runs: Path, tmp_path: Path) -> None:
    data = f"data={_new_compounds(tmp_path)}"
    members = [runs / "pair" / "seed-0", runs / "pair" / "seed-1"]
    singles = []
    for i, member in enumerate(members):
        assert main(["predict", str(member), data, "-o", str(tmp_path / f"{i}.csv")]) == 0
        singles.append([float(r["prediction"]) for r in _rows(tmp_path / f"{i}.csv")])
    assert main(["predict", str(runs / "pair"), data, "-o", str(tmp_path / "seeds.csv")]) == 0
    ensemble = _rows(tmp_path / "seeds.csv")
    explicit = tmp_path / "explicit.csv"
    args = ["predict", str(members[0]), data, "--ensemble", str(members[1]), "-o", str(explicit)]
    assert main(args) == 0
    assert _rows(explicit) == ensemble
    values = torch.tensor(singles, dtype=torch.float64)
    mean, std = values.mean(0), values.std(0)
    assert len(ensemble) == 4
    for i, row in enumerate(ensemble):
        assert row["models"] == "2"
        # float32 models: 9 significant digits in the file, each member's and the mean.
        assert float(row["prediction"]) == pytest.approx(float(mean[i]), rel=1e-8)
        assert float(row["std"]) == pytest.approx(float(std[i]), rel=1e-6)
    assert float(std.min()) > 0


def test_predict_reads_a_compounds_file_whose_compounds_have_no_value(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _new_compounds(tmp_path)
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs / "one"), f"data={path}", "-o", str(out)]) == 0
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["new-0", "new-1", "new-2", "new-3"]
    assert "target" not in rows[0]
    assert main(["predict", str(runs / "one"), "epochs=3", "-o", str(out)]) == 2
    assert "predict takes only the keys that choose the compounds" in capsys.readouterr().err


def test_the_best_model_needs_a_validation_split(
    runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(runs / "pair" / "seed-0"), "--best"]) == 2
    assert "val_fraction > 0" in capsys.readouterr().err


@pytest.mark.cuda
def test_a_model_trained_on_cuda_predicts_the_same_on_the_cpu(tmp_path: Path) -> None:
    args = ["train", *TINY, "dtype=float64", "device=cuda", f"output_dir={tmp_path}", "name=g"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert metrics["peak_memory_kind"].startswith("CUDA tensors over the run")
    assert metrics["peak_memory_bytes"] > 0
    test = load_data(model_config(tmp_path / "g")).test
    on_cpu = predict([load(tmp_path / "g")], test).combined
    on_gpu = predict([load(tmp_path / "g", device="cuda")], test).combined
    assert torch.allclose(on_cpu, on_gpu, rtol=1e-12, atol=1e-12)
    target = torch.stack([c.target for c in test])
    assert rmse(on_cpu, target) == pytest.approx(metrics["test"]["rmse"], rel=1e-12)


def test_predict_best_needs_only_the_best_model(runs: Path, tmp_path: Path) -> None:
    """A corrupted final model failed `predict --best`: its config was read from model.json."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("model.json", "model.safetensors", "best.json", "best.safetensors"):
        (folder / name).write_bytes((runs / "one" / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"not weights")
    expected, out = tmp_path / "expected.csv", tmp_path / "p.csv"
    assert main(["predict", str(runs / "one"), "--best", "-o", str(expected)]) == 0
    assert main(["predict", str(folder), "--best", "-o", str(out)]) == 0
    assert _rows(out) == _rows(expected)


def test_predict_file_gives_a_file_s_compounds_in_order(runs: Path, tmp_path: Path) -> None:
    path = _new_compounds(tmp_path)
    done = combframe.app.predict_file(runs / "one", data=path)
    compounds, result = done.compounds, done.predictions
    assert [c.name for c in compounds] == ["new-0", "new-1", "new-2", "new-3"]
    assert main(["predict", str(runs / "one"), f"data={path}", "-o", str(tmp_path / "p.csv")]) == 0
    rows = _rows(tmp_path / "p.csv")
    assert [float(r["prediction"]) for r in rows] == result.combined.tolist()
    pair = combframe.app.predict_file(runs / "pair", data=path)
    assert [c.name for c in pair.compounds] == [c.name for c in compounds]
    assert pair.predictions.models == 2 and pair.skipped == ()


def test_a_float64_model_predicts_float32_compounds_and_says_what_to_cast(runs: Path) -> None:
    """The loaded float64 model raised torch's bare "mat1 and mat2 must have the same dtype"."""
    model = load(runs / "one")
    config = model_config(runs / "one").model_copy(update={"dtype": "float32"})
    single = load_data(config, for_prediction=True).train[:4]
    assert single[0].poses.dtype == torch.float32
    wide = load_data(model_config(runs / "one"), for_prediction=True).train[:4]
    # predict casts every compound to the model's dtype
    assert torch.allclose(
        predict([model], single).combined, predict([model], wide).combined, rtol=1e-6
    )
    with pytest.raises(CombframeError, match=r"torch.float32 while its parameters are torch."):
        model(list(single[0].poses))


def test_an_ensemble_of_a_molecular_and_a_vector_model_speaks_of_molecules(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "the model of ... was trained on 0 features"."""
    folder = tmp_path / "mol"
    folder.mkdir()
    for name in ("model.json", "model.safetensors"):
        (folder / name).write_bytes((runs / "one" / name).read_bytes())
    meta = json.loads((folder / "model.json").read_text())
    meta["network"] = {"features": 0, "kind": "molecules"}
    (folder / "model.json").write_text(json.dumps(meta))
    assert main(["predict", str(runs / "one"), "--ensemble", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "the compounds are feature vectors; the model of" in err
    assert "was trained on molecules (atoms and their 3D positions)" in err
    assert "0 features" not in err
