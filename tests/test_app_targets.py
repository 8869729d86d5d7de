"""Several targets at once in the app: a list ``reader.target``, masked loss, per-target output."""

from __future__ import annotations

import copy
import csv
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

import combframe
from combframe.app import load
from combframe.app.building import build_run
from combframe.app.cli import main
from combframe.app.config import ConfigError, load_config
from combframe.app.distributed import Ranks
from combframe.app.metrics import multi_target_metrics, rmse
from combframe.app.train import _step, load_data
from tests.conftest import torchrun_train

FAST = ["epochs=2", "plot=false", "memory=false", "--no-progress"]


def _json(tmp_path: Path, count: int = 24, seed: int = 0) -> Path:
    """Compounds of 3 to 5 poses of 4 features; ``a`` for all, ``b`` for two thirds."""
    gen = torch.Generator().manual_seed(seed)
    compounds = []
    for c in range(count):
        poses = torch.randn((3 + c % 3, 4), generator=gen, dtype=torch.float64)
        value: dict[str, float | None] = {"a": float(poses[:, 0].min())}
        if c % 3:
            value["b"] = float(poses[:, 1].max())
        elif c % 2:
            value["b"] = None
        compounds.append({"name": f"c{c}", "value": value, "poses": poses.tolist()})
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"compounds": compounds}))
    return path


def _config(*overrides: str) -> Any:
    return load_config(None, list(overrides))


# ---- the configuration ------------------------------------------------------------------


def test_a_list_of_targets_is_parsed_and_one_name_stays_one_value() -> None:
    assert _config("reader.target=[a, b]").reader.targets == ("a", "b")
    assert _config("reader.target=a").reader.targets == ()
    assert _config().reader.targets == ()
    assert _config("reader.target=[a,b]", "loss.weights=[1, 0.5]").loss.weights == [1, 0.5]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["reader.target=[a, a]"], "names the target(s) ['a'] twice"),
        (["reader.target=[]"], "must hold non-empty names"),
        (["reader.target=[a,b]", "loss.weights=[1]"], "loss.weights has 1 weight(s)"),
        (["reader.target=[a,b]", "loss.weights=[1,-1]"], "finite numbers > 0"),
        (["loss.weight=[1]"], "did you mean 'weights'"),
    ],
)
def test_bad_target_settings_name_the_key(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(*overrides)
    assert words in str(info.value), str(info.value)


def test_the_built_in_synthetic_set_refuses_several_targets() -> None:
    with pytest.raises(ConfigError, match="need data=<file>"):
        load_data(_config("reader.target=[a,b]"))


# ---- reading ---------------------------------------------------------------------------


def test_json_values_per_target_missing_ones_nan(tmp_path: Path) -> None:
    data = load_data(_config(f"data={_json(tmp_path)}", "reader.target=[a,b]", "dtype=float64"))
    assert data.targets == ("a", "b")
    every = torch.stack([c.target for c in (*data.train, *data.test)])
    assert every.shape == (24, 2)
    assert every[:, 0].isfinite().all() and every[:, 1].isnan().sum() == 8


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"a": None}, "has no value for any target (a, b)"),
        ({"a": 1.0, "bb": 2.0}, "names 'bb', which is not a target; did you mean 'b'?"),
        (3.0, "'value' must map each target (a, b)"),
        ({"a": "x"}, "'value' 'a' must be a number"),
    ],
)
def test_bad_json_values_are_refused(tmp_path: Path, value: Any, words: str) -> None:
    path = tmp_path / "bad.json"
    entries = [
        {"value": {"a": 1.0, "b": 2.0}, "poses": [[0.0]]},
        {"value": value, "poses": [[1.0]]},
    ]
    path.write_text(json.dumps({"compounds": entries}))
    with pytest.raises(ConfigError) as info:
        load_data(_config(f"data={path}", "reader.target=[a,b]"))
    assert words in str(info.value), str(info.value)


def test_a_target_no_json_compound_has_lists_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_data(_config(f"data={_json(tmp_path)}", "reader.target=[a,b,c]"))
    assert "no compound has a value for the target 'c'" in str(info.value)
    assert "the value keys in the file: a, b" in str(info.value)


def test_a_built_in_set_refuses_several_targets(tmp_path: Path) -> None:
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    with pytest.raises(ConfigError, match="built-in cmet: has one value per compound"):
        load_data(_config("data=cmet", "reader.target=[a,b]", f"reader.cache_dir={tmp_path}"))


def test_a_target_without_training_values_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "held.json"
    entries = [{"value": {"a": float(i)}, "poses": [[float(i)]]} for i in range(5)]
    entries[0]["value"]["b"] = 1.0  # the only value of b
    path.write_text(json.dumps({"compounds": entries}))
    config = _config(f"data={path}", "reader.target=[a,b]", "test_fraction=0.2", "seed=1")
    data = load_data(config)
    assert all(c.target[1].isnan() for c in data.train), "the seed must hold b's value out"
    with pytest.raises(ConfigError, match="no training compound has a value for 'b'"):
        build_run(config, data, torch.device("cpu"), Ranks())


# ---- the loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_masked_weighted_loss_and_gradient_equal_the_hand_computed_ones(
    tmp_path: Path, strategy: str
) -> None:
    """A missing value adds nothing: L = sum over present (c, j) of w_j (G_cj - y_cj)^2 / |P|."""
    config = _config(
        f"data={_json(tmp_path)}",
        "reader.target=[a,b]",
        "loss.weights=[2, 0.5]",
        "dtype=float64",
        f"strategy={strategy}",
        "chunk_size=2",
        "combination.name=boltzmann",
    )
    run = build_run(config, load_data(config), torch.device("cpu"), Ranks())
    batch = list(run.data.train[:6])
    assert any(c.target.isnan().any() for c in batch), "the batch must hold a gap"
    net = copy.deepcopy(run.model.model)
    combination = config.combination.build()

    total = _step(run, batch, 1)

    losses, squares, present = [], [], 0
    for c in batch:
        preds = net(c.poses)  # (N, 2): the full graph of every pose
        for j, w in enumerate((2.0, 0.5)):
            if math.isfinite(float(c.target[j])):
                error = (combination.value(preds[:, j]) - c.target[j]) ** 2
                losses.append(w * error)
                squares.append(float(error.detach()))
                present += 1
    (sum(losses) / present).backward()
    assert total == pytest.approx(sum(squares), rel=1e-12)
    for got, want in zip(run.model.model.parameters(), net.parameters(), strict=True):
        assert got.grad is not None and want.grad is not None
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


# ---- metrics ---------------------------------------------------------------------------


def test_metrics_per_target_on_the_compounds_with_a_value_and_their_mean() -> None:
    pred = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 9.0], [4.0, 7.0]])
    target = torch.tensor([[1.5, 5.0], [2.0, math.nan], [2.0, 8.0], [4.5, math.nan]])
    out, _ = multi_target_metrics(pred, target, ["a", "b"])
    assert out["targets"]["a"]["rmse"] == pytest.approx(rmse(pred[:, 0], target[:, 0]))
    assert out["targets"]["b"]["rmse"] == pytest.approx(math.sqrt(0.5))
    assert out["targets"]["b"]["compounds"] == 2 and out["compounds"] == 4
    assert out["rmse"] == pytest.approx((out["targets"]["a"]["rmse"] + math.sqrt(0.5)) / 2)
    assert out["rmse"] == pytest.approx(rmse(pred, target)), "what selects the best model"
    assert set(out["targets"]["a"]) >= {"mae", "pearson", "spearman", "kendall", "ci95"}


# ---- train, save, predict ----------------------------------------------------------------


def test_two_targets_train_save_predict_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _json(tmp_path)
    args = ["train", f"data={data}", "reader.target=[a,b]", "val_fraction=0.2", *FAST]
    assert main([*args, f"output_dir={tmp_path}", "name=run", "normalize_targets=true"]) == 0
    out = capsys.readouterr().out
    assert "mean of 2 targets" in out and "\n  a: RMSE" in out and "\n  b: RMSE" in out
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test"]["targets"]) == {"a", "b"}
    assert json.loads((run / "model.json").read_text())["targets"] == ["a", "b"]

    csv_path, poses_path = tmp_path / "p.csv", tmp_path / "poses.csv"
    assert main(["predict", str(run), "-o", str(csv_path), "--poses", str(poses_path)]) == 0
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert list(rows[0])[:4] == ["index", "name", "prediction_a", "prediction_b"]
    assert rows[0]["target_b"] == "" and rows[1]["target_b"] != ""
    model = load(run)
    compounds = load_data(load_config(run / "config.yaml")).train
    with torch.no_grad():
        combined = model(compounds=[list(c.poses) for c in compounds]).combined
    by_name = {r["name"]: (float(r["prediction_a"]), float(r["prediction_b"])) for r in rows}
    for c, want in zip(compounds, combined.tolist(), strict=True):
        assert by_name[str(c.name)] == pytest.approx(want, rel=1e-6)
    pose_rows = list(csv.DictReader(poses_path.read_text().splitlines()))
    assert {"weight_a", "weight_b"} <= set(pose_rows[0])
    first = [r for r in pose_rows if r["name"] == "c0"]
    assert sum(float(r["weight_b"]) for r in first) == pytest.approx(1.0, abs=1e-3)

    assert main(["predict", str(run), "-o", str(csv_path), "reader.target=[b,a]"]) == 2
    assert "predicts ['a', 'b']; the data name ['b', 'a']" in capsys.readouterr().err


def test_one_target_keeps_scalar_shapes_and_columns(tmp_path: Path) -> None:
    assert main(["train", "compounds=24", *FAST, f"output_dir={tmp_path}", "name=one"]) == 0
    meta = json.loads((tmp_path / "one" / "model.json").read_text())
    assert meta["targets"] == []
    assert "targets" not in json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]
    csv_path = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "one"), "-o", str(csv_path)]) == 0
    assert csv_path.read_text().splitlines()[0] == "index,name,prediction,target"


class OneValue(torch.nn.Module):
    """A user network returning one value per pose: ``(b,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).reshape(-1)


def test_a_user_network_must_return_one_column_per_target(tmp_path: Path) -> None:
    config = _config(
        f"data={_json(tmp_path)}", "reader.target=[a,b]", f"model.name={__name__}:OneValue"
    )
    with pytest.raises(ConfigError) as info:
        build_run(config, load_data(config), torch.device("cpu"), Ranks())
    assert "must return shape (b, 2), one column per target" in str(info.value)


# ---- molecules ---------------------------------------------------------------------------


def test_sd_properties_and_csv_columns_as_targets(tmp_path: Path) -> None:
    Chem = pytest.importorskip("rdkit.Chem")
    pytest.importorskip("torch_geometric")
    folder = Path(str(resources.files("rdkit").joinpath("Contrib", "FreeWilson", "data")))
    supplier = Chem.SDMolSupplier(str(folder / "cmet_ligands.sdf"), removeHs=False)
    sdf = tmp_path / "two.sdf"
    with Chem.SDWriter(str(sdf)) as writer:
        for i, mol in zip(range(4), supplier, strict=False):
            if i % 2:
                mol.SetProp("ki", str(6.0 + i))
            writer.write(mol)
    cache = f"reader.cache_dir={tmp_path / 'cache'}"
    config = _config(f"data={sdf}", "reader.target=[r_exp_dg, ki]", cache)
    every = torch.stack([c.target for c in (*load_data(config).train, *load_data(config).test)])
    assert every.shape == (4, 2) and int(every[:, 1].isnan().sum()) == 2
    with pytest.raises(ConfigError) as info:
        load_data(_config(f"data={sdf}", "reader.target=[r_exp_dg, kii]", cache))
    assert "no record has the SD property 'kii'" in str(info.value)
    assert "did you mean 'ki'?" in str(info.value)
    to_predict = _config(f"data={sdf}", "reader.target=[r_exp_dg, kii]", cache)
    predicted = load_data(to_predict, for_prediction=True).train
    assert all(c.target.shape == (2,) and c.target[1].isnan() for c in predicted)

    names = [m.GetProp("_Name") for m in Chem.SDMolSupplier(str(sdf))]
    values = tmp_path / "values.csv"
    values.write_text("name,pIC50,logD\n" + "".join(f"{n},{i},\n" for i, n in enumerate(names)))
    config = _config(f"data={sdf}", f"reader.values={values}", "reader.target=[pic50,logd]", cache)
    with pytest.raises(ConfigError) as info:
        load_data(_config(f"data={sdf}", f"reader.values={values}", "reader.target=[pic5]", cache))
    assert "'pic5' is not a column; did you mean 'pic50'?" in str(info.value)
    assert "its columns: name, pic50, logd" in str(info.value)
    target = torch.stack([c.target for c in load_data(config).train])
    assert target[:, 1].isnan().all() and target[:, 0].isfinite().all()


def test_schnet_trains_two_targets(tmp_path: Path) -> None:
    Chem = pytest.importorskip("rdkit.Chem")
    pytest.importorskip("torch_geometric")
    smiles = tmp_path / "two.csv"
    rows = ["CCO,1.0,2.0", "CCCO,1.5,", "CCN,2.0,3.0", "CCCN,2.5,3.5", "CCCC,3.0,"]
    smiles.write_text("smiles,y1,y2\n" + "\n".join(rows) + "\n")
    assert Chem.MolFromSmiles("CCO") is not None
    args = [f"data={smiles}", "reader.target=[y1,y2]", "reader.conformers=2", "hidden=8"]
    args += ["model.interactions=1", "test_fraction=0.4", f"reader.cache_dir={tmp_path / 'c'}"]
    assert main(["train", *args, *FAST, f"output_dir={tmp_path}", "name=mol"]) == 0
    metrics = json.loads((tmp_path / "mol" / "metrics.json").read_text())
    assert set(metrics["test"]["targets"]) == {"y1", "y2"}
    model = load(tmp_path / "mol")
    assert isinstance(model, combframe.MultiPoseModel)


def test_manifest_columns_as_targets_and_a_compound_without_any_value(tmp_path: Path) -> None:
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    pdb = Path(str(resources.files("posebusters").joinpath("datasets", "pdb")))
    values = {"1ia1": "6.5,", "1uou": "7.0,2.5", "1s3v": ",1.5", "1of6": ","}  # pIC50,logD
    rows = [f"{code},{v},{pdb}/{code}/{code}_ligand.sdf" for code, v in values.items()]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("compound,pIC50,logD,poses\n" + "\n".join(rows) + "\n")
    base = [f"data={manifest}", "reader.target=[pIC50,logD]", f"reader.cache_dir={tmp_path}"]
    with pytest.raises(ConfigError) as info:
        load_data(_config(*base))
    assert "(compound '1of6'): has no value" in str(info.value)
    data = load_data(_config(*base, "reader.skip_invalid=true"))
    every = {c.name: c.target.tolist() for c in (*data.train, *data.test)}
    assert set(every) == {"1ia1", "1uou", "1s3v"}
    assert every["1uou"] == [7.0, 2.5] and math.isnan(every["1ia1"][1])
    with pytest.raises(ConfigError, match="'logP' is not a column; did you mean 'logd'"):
        load_data(_config(*base[:1], "reader.target=[pIC50,logP]", base[2]))
    smi = tmp_path / "a.smi"
    smi.write_text("CCO a 1.0\nCCN b 2.0\n")
    with pytest.raises(ConfigError, match=r"a \.smi file holds one value per line"):
        load_data(_config(f"data={smi}", "reader.target=[x,y]", base[2]))


def test_a_smi_file_takes_several_targets_from_a_values_csv(tmp_path: Path) -> None:
    """Like an SDF: ``reader.values`` with a column per target gives a .smi several targets."""
    pytest.importorskip("rdkit")
    smi = tmp_path / "series.smi"
    smi.write_text("CCO a\nCCN b\nCCCO c\n")
    values = tmp_path / "two.csv"
    values.write_text("name,a,b\na,1.0,2.0\nb,1.5,\nc,2.0,3.0\n")
    config = _config(
        f"data={smi}",
        f"reader.values={values}",
        "reader.target=[a,b]",
        "reader.conformers=1",
        f"reader.cache_dir={tmp_path / 'c'}",
    )
    data = load_data(config)
    every = {c.name: c.target.tolist() for c in (*data.train, *data.test)}
    assert every["a"] == [1.0, 2.0] and every["c"] == [2.0, 3.0]
    assert every["b"][0] == 1.5 and math.isnan(every["b"][1])


@pytest.mark.slow
def test_two_targets_under_torchrun_match_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batches of 7 leave ranks with different numbers of values: |P| is the whole batch's."""
    settings = [f"data={_json(tmp_path)}", "reader.target=[a,b]", "loss.weights=[1,2]"]
    settings += ["dtype=float64", "batch_size=7", *FAST, f"output_dir={tmp_path}"]
    assert main(["train", *settings, "name=one"]) == 0
    capsys.readouterr()
    torchrun_train(*settings, "name=two")
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    for name in ("a", "b"):
        want, got = one["test"]["targets"][name]["rmse"], two["test"]["targets"][name]["rmse"]
        assert got == pytest.approx(want, rel=1e-9)
    assert two["history"][-1]["train_rmse"] == pytest.approx(one["history"][-1]["train_rmse"])


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_two_targets_on_cuda_match_the_cpu(tmp_path: Path, strategy: str) -> None:
    """The masked loss runs on the device (no NaN in any gradient) and gives the CPU's run."""
    settings = [f"data={_json(tmp_path)}", "reader.target=[a,b]", "dtype=float64"]
    settings += [f"strategy={strategy}", *FAST, f"output_dir={tmp_path}"]
    for device in ("cpu", "cuda"):
        assert main(["train", *settings, f"device={device}", f"name={device}"]) == 0
    cpu, gpu = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("cpu", "cuda"))
    for name in ("a", "b"):
        want, got = cpu["test"]["targets"][name]["rmse"], gpu["test"]["targets"][name]["rmse"]
        assert got == pytest.approx(want, rel=1e-9)


def test_two_targets_with_a_prior_and_a_mask_from_pose_fields(tmp_path: Path) -> None:
    """Each column is combined under the same per-pose prior and mask."""
    data = json.loads(_json(tmp_path).read_text())
    for c in data["compounds"]:
        n = len(c["poses"])
        c["properties"] = {"score": [-float(i) for i in range(n)], "ok": [1] * (n - 1) + [0]}
    path = tmp_path / "fields.json"
    path.write_text(json.dumps(data))
    args = [f"data={path}", "reader.target=[a,b]", "prior.field=score", "prior.kind=energy"]
    args += ["mask.field=ok", "combination.name=boltzmann", *FAST, f"output_dir={tmp_path}"]
    assert main(["train", *args, "name=run"]) == 0
    out, poses = tmp_path / "p.csv", tmp_path / "poses.csv"
    assert main(["predict", str(tmp_path / "run"), "-o", str(out), "--poses", str(poses)]) == 0
    rows = list(csv.DictReader(poses.read_text().splitlines()))
    last = [r for r in rows if r["name"] == "c0"][-1]  # masked: no weight in either column
    assert float(last["weight_a"]) == 0 and float(last["weight_b"]) == 0


def test_gated_attention_pools_the_targets_and_predict_writes_its_one_weight(
    tmp_path: Path,
) -> None:
    """dim = the number of targets; --poses has one weight column, alpha, not one per target."""
    args = ["train", f"data={_json(tmp_path)}", "reader.target=[a,b]", *FAST]
    args += ["combination.name=gated_attention", "combination.dim=2", "combination.hidden=3"]
    assert main([*args, f"output_dir={tmp_path}", "name=run"]) == 0
    poses = tmp_path / "poses.csv"
    out = ["predict", str(tmp_path / "run"), "-o", str(tmp_path / "p.csv"), "--poses", str(poses)]
    assert main(out) == 0
    rows = list(csv.DictReader(poses.read_text().splitlines()))
    assert list(rows[0])[-3:] == ["prediction_a", "prediction_b", "weight"]
    first = [float(r["weight"]) for r in rows if r["name"] == "c0"]
    assert sum(first) == pytest.approx(1.0, abs=1e-6) and min(first) > 0
