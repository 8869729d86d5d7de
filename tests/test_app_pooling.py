"""A pooling combination (``gated_attention``) in the app: embeddings, a head, saved, predicted.

The network returns ``combination.dim`` values per pose, the combination pools them per
compound and a linear head (the model's ``comb_readout``) maps the pooled embedding to
the target(s); the head and the combination's own layers are trained and saved.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

import combframe
from combframe.app import load
from combframe.app.building import build_run
from combframe.app.cli import main
from combframe.app.config import ConfigError, load_config
from combframe.app.distributed import Ranks
from combframe.app.train import _step, load_data
from tests.conftest import torchrun_train

ATTENTION = ["combination.name=gated_attention", "combination.hidden=8"]
POOL = [*ATTENTION, "combination.dim=4"]
FAST = ["epochs=2", "plot=false", "memory=false", "--no-progress", "hidden=8"]
SMALL = ["compounds=16", "poses_per_compound=3", "batch_size=4"]


def _json(tmp_path: Path, count: int = 12, two: bool = True) -> Path:
    """Compounds of 2 to 4 poses of 3 features, two values each (``a``, ``b``) or one."""
    gen = torch.Generator().manual_seed(0)
    compounds = []
    for c in range(count):
        poses = torch.randn((2 + c % 3, 3), generator=gen, dtype=torch.float64)
        a, b = float(poses[:, 0].min()), float(poses[:, 1].max())
        value: dict[str, float] | float = {"a": a, "b": b} if two else a
        compounds.append({"name": f"c{c}", "value": value, "poses": poses.tolist()})
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"compounds": compounds}))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def _check_pose_weights(poses_csv: Path, predictions: Path | None = None) -> None:
    """One pooling weight per pose, summing to 1 per compound, after the head's values.

    With the compounds' ``predictions`` (one model): the weights times the poses'
    values f(e_i) add up to each compound's prediction f(sum_i alpha_i e_i).
    """
    rows = _rows(poses_csv)
    columns = [k for k in rows[0] if k.startswith("prediction")]
    assert list(rows[0]) == ["index", "name", "pose", *columns, "weight"] and columns
    sums: dict[str, list[float]] = {}
    for row in rows:
        w = float(row["weight"])
        total = sums.setdefault(row["index"], [0.0] * (1 + len(columns)))
        total[0] += w
        for k, column in enumerate(columns, 1):
            total[k] += w * float(row[column])
    assert sums and all(s[0] == pytest.approx(1.0, abs=1e-6) for s in sums.values())
    if predictions is not None:
        for row in _rows(predictions):
            want = [float(row[c]) for c in columns]
            assert sums[row["index"]][1:] == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("dtype", "dim"), [("float32", 4), ("float64", 4), ("float64", 1)])
def test_gated_attention_trains_saves_and_predicts_from_the_command_line(
    tmp_path: Path, dtype: str, dim: int, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = [*ATTENTION, f"combination.dim={dim}", *SMALL, *FAST, f"dtype={dtype}"]
    settings += ["normalize_targets=true"]
    assert main(["train", *settings, f"output_dir={tmp_path}", "name=run"]) == 0
    run = tmp_path / "run"
    meta = json.loads((run / "model.json").read_text())
    assert meta["config"]["combination"]["dim"] == dim
    model = load(run)
    assert isinstance(model.comb_readout, torch.nn.Module)
    state = model.state_dict()
    assert {"comb_readout.net.linear.weight", "combination.V.weight"} <= set(state)
    wanted = torch.float64 if dtype == "float64" else torch.float32
    assert {p.dtype for p in model.parameters()} == {wanted}

    out, poses = tmp_path / "p.csv", tmp_path / "poses.csv"
    assert main(["predict", str(run), "-o", str(out), "--poses", str(poses)]) == 0
    assert "pooling weights" in capsys.readouterr().out
    rows = _rows(out)
    compounds = load_data(load_config(run / "config.yaml"), for_prediction=True).train
    with torch.no_grad():
        combined = model(compounds=[list(c.poses) for c in compounds]).combined
    assert combined.shape == (len(compounds),)
    got = [float(r["prediction"]) for r in rows]
    assert got == pytest.approx(combined.tolist(), rel=1e-6)
    _check_pose_weights(poses, out)


def test_gated_attention_with_two_targets_and_a_seeds_ensemble(tmp_path: Path) -> None:
    settings = [f"data={_json(tmp_path)}", "reader.target=[a,b]", *POOL, *FAST]
    assert main(["train", *settings, "--seeds", "2", f"output_dir={tmp_path}", "name=s"]) == 0
    folder = tmp_path / "s"
    out, poses = tmp_path / "p.csv", tmp_path / "poses.csv"
    assert main(["predict", str(folder), "-o", str(out), "--poses", str(poses)]) == 0
    rows = _rows(out)
    assert {"prediction_a", "prediction_b", "std_a", "std_b"} <= set(rows[0])
    assert rows[0]["models"] == "2"
    _check_pose_weights(poses)


@pytest.mark.parametrize("targets", [[], ["reader.target=[a,b]"]])
@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_one_step_of_the_app_gives_the_full_graph_gradient(
    tmp_path: Path, strategy: str, targets: list[str]
) -> None:
    """L = sum over (c, j) of (f(G_c)_j - y_cj)^2 / |P|: network, attention and head, float64."""
    settings = [f"data={_json(tmp_path, two=bool(targets))}", *targets, *POOL, "dtype=float64"]
    config = load_config(None, [*settings, f"strategy={strategy}", "chunk_size=2"])
    run = build_run(config, load_data(config), torch.device("cpu"), Ranks())
    batch = list(run.data.train[:5])
    reference = copy.deepcopy(run.model)
    net, combination, head = reference.model, reference.combination, reference.comb_readout
    assert isinstance(head, torch.nn.Module)

    total = _step(run, batch, 1)

    errors = []
    for c in batch:
        pooled = combination.value(net(c.poses))  # every pose's graph at once
        errors.append(((head(pooled) - c.target) ** 2).sum())
    values = sum(c.target.numel() for c in batch)
    (sum(errors) / values).backward()
    assert total == pytest.approx(float(sum(e.detach() for e in errors)), rel=1e-12)
    got = dict(run.model.named_parameters())
    for name, want in reference.named_parameters():
        assert got[name].grad is not None and want.grad is not None, name
        torch.testing.assert_close(got[name].grad, want.grad, rtol=1e-9, atol=1e-12)


def test_gated_attention_pools_schnet_embeddings_of_molecules(tmp_path: Path) -> None:
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    cache = f"reader.cache_dir={tmp_path / 'cache'}"
    settings = ["data=cmet", "reader.limit=6", cache, *POOL, *FAST, "model.interactions=1"]
    settings += ["test_fraction=0.34", "strategy=stream"]
    assert main(["train", *settings, f"output_dir={tmp_path}", "name=mol"]) == 0
    out, poses = tmp_path / "p.csv", tmp_path / "poses.csv"
    args = ["predict", str(tmp_path / "mol"), "-o", str(out), "--poses", str(poses)]
    assert main(args) == 0
    assert len(_rows(out)) == 6
    _check_pose_weights(poses, out)


def test_gated_attention_with_a_prior_and_a_mask_from_pose_fields(tmp_path: Path) -> None:
    """The prior and mask enter the pooling weights: a masked pose gets none."""
    data = json.loads(_json(tmp_path, two=False).read_text())
    for c in data["compounds"]:
        n = len(c["poses"])
        c["properties"] = {"score": [-float(i) for i in range(n)], "ok": [1] * (n - 1) + [0]}
    path = tmp_path / "fields.json"
    path.write_text(json.dumps(data))
    args = [f"data={path}", "prior.field=score", "prior.kind=energy", "mask.field=ok", *POOL]
    assert main(["train", *args, *FAST, f"output_dir={tmp_path}", "name=run"]) == 0
    out, poses = tmp_path / "p.csv", tmp_path / "poses.csv"
    assert main(["predict", str(tmp_path / "run"), "-o", str(out), "--poses", str(poses)]) == 0
    _check_pose_weights(poses)
    last = [r for r in _rows(poses) if r["name"] == "c0"][-1]
    assert float(last["weight"]) == 0


class ThreeValues(torch.nn.Module):
    """A user network returning three values per pose: ``(b, 3)``."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).reshape(x.shape[0], 3)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ([], "with one target the network must return shape (b,), one value per pose,"),
        (POOL, "the network must return shape (b, 4), combination.dim=4 values per pose"),
    ],
)
def test_a_user_network_of_the_wrong_width_is_refused_before_training(
    extra: list[str], words: str
) -> None:
    config = load_config(None, [*SMALL, f"model.name={__name__}:ThreeValues", *extra])
    with pytest.raises(ConfigError) as info:
        build_run(config, load_data(config), torch.device("cpu"), Ranks())
    assert words in str(info.value)
    assert f"model.name '{__name__}:ThreeValues'" in str(info.value)


def test_a_pooling_combination_without_a_dim_is_refused() -> None:
    from combframe.app.models import pooled_dim

    class NoDim(combframe.Combination[combframe.CombinationParams]):
        name = "nodim_pool"
        pools = True

        def value(self, preds: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
            return preds.mean(0)

    with pytest.raises(ConfigError, match="has no integer dim setting"):
        pooled_dim(NoDim())


@pytest.mark.slow
def test_gated_attention_under_torchrun_matches_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = [*POOL, *SMALL, *FAST, "dtype=float64", f"output_dir={tmp_path}"]
    assert main(["train", *settings, "name=one"]) == 0
    capsys.readouterr()
    torchrun_train(*settings, "name=two")
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert two["history"][-1]["train_rmse"] == pytest.approx(one["history"][-1]["train_rmse"])
    assert two["test"]["rmse"] == pytest.approx(one["test"]["rmse"], rel=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_gated_attention_on_cuda_matches_the_cpu(tmp_path: Path, strategy: str) -> None:
    """The combination's layers and the head follow the model onto the device."""
    settings = [*POOL, *SMALL, *FAST, "dtype=float64", f"strategy={strategy}"]
    for device in ("cpu", "cuda"):
        where = [f"device={device}", f"output_dir={tmp_path}", f"name={device}"]
        assert main(["train", *settings, *where]) == 0
    cpu, gpu = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("cpu", "cuda"))
    assert gpu["test"]["rmse"] == pytest.approx(cpu["test"]["rmse"], rel=1e-9)
    model = load(tmp_path / "cuda", device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}


@pytest.mark.slow
def test_a_stopped_gated_attention_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """The head's and the attention's weights and optimizer state are checkpointed."""
    from tests.test_app_runs import TINY, _child, _weights

    assert main(["train", *TINY, *POOL, f"output_dir={tmp_path}", "name=full"]) == 0
    proc = _child(tmp_path, "sigterm-mid-epoch", 5, "t", *POOL)
    assert proc.returncode == 128 + 15, proc.stderr
    assert main(["train", "--resume", str(tmp_path / "t"), "--no-progress"]) == 0
    resumed, full = _weights(tmp_path / "t"), _weights(tmp_path / "full")
    assert {"comb_readout.linear.weight", "combination.V.weight"} <= set(full)
    assert resumed.keys() == full.keys()
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
