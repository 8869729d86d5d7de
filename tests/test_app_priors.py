"""Priors and masks from a pose field (``prior.*``, ``mask.*``): the same prior as the
core's ``prior=``, in training, evaluation and prediction, kept by a saved run, and each
bad value refused with the compound and the pose named."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import combframe
from combframe.app.cli import main
from combframe.app.config import ConfigError, load_config
from combframe.app.predict import load, predict, predict_file
from combframe.app.priors import log_priors
from combframe.app.train import load_data, train
from combframe.testing import isolated_registry, register_plugin

FAST = ["epochs=1", "plot=false", "memory=false", "dtype=float64", "hidden=4"]
SCORES = [[-7.5, -9.0, -8.1], [-6.0, -6.5], [-8.2, -7.7, -9.9, -8.0]]
PROBS = [[0.5, 0.25, 1.0], [0.9, 0.1], [0.3, 0.3, 0.2, 0.2]]
KEEP = [[1, 0, 1], [0, 1], [1, 1, 0, 1]]


def _file(tmp_path: Path, **change: Any) -> Path:
    """Three compounds of 3, 2 and 4 two-feature poses with three pose fields."""
    gen = torch.Generator().manual_seed(0)
    compounds = []
    for i, scores in enumerate(SCORES):
        n = len(scores)
        props = {"score": scores, "prob": PROBS[i], "keep": KEEP[i]}
        compounds.append(
            {
                "name": f"c{i}",
                "value": -7.0 - i,
                "poses": torch.randn(n, 2, generator=gen).tolist(),
                "properties": {**props, **change.get(f"c{i}", {})},
            }
        )
    path = tmp_path / "compounds.json"
    path.write_text(json.dumps({"compounds": compounds}))
    return path


def _by_hand(kind: str, masked: bool, kT: float = 0.593) -> list[Tensor]:
    """The log prior weights ``prior.kind`` stands for, written out."""
    out = []
    for scores, probs, keep in zip(SCORES, PROBS, KEEP, strict=True):
        x = torch.tensor(probs if kind == "probability" else scores, dtype=torch.float64)
        kept = torch.tensor(keep) != 0 if masked else torch.ones(len(x), dtype=torch.bool)
        lowest = x[kept].min()  # a masked pose does not count
        p = {"log_weight": x, "probability": x.log(), "energy": -(x - lowest) / kT}[kind]
        p = p.masked_fill(~kept, -math.inf)
        out.append(p)
    return out


def _config(path: Path, *extra: str) -> Any:
    return load_config(None, [f"data={path}", *FAST, *extra])


@pytest.mark.parametrize(
    ("kind", "field"), [("log_weight", "score"), ("probability", "prob"), ("energy", "score")]
)
@pytest.mark.parametrize("masked", [False, True])
def test_a_field_gives_exactly_the_prior_passed_by_hand(
    tmp_path: Path, kind: str, field: str, masked: bool
) -> None:
    keys = [f"prior.field={field}", f"prior.kind={kind}", "combination.name=boltzmann"]
    keys += ["mask.field=keep"] if masked else []
    data = load_data(_config(_file(tmp_path), *keys), for_prediction=True)
    want = _by_hand(kind, masked)
    got = log_priors(data.train)
    assert got is not None and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w.to(g.dtype))
    model = combframe.MultiPoseModel(torch.nn.Linear(2, 1).double(), "boltzmann")
    poses = [list(c.poses) for c in data.train]
    with torch.no_grad():
        mine = predict([model], data.train)
        hand = model(compounds=poses, prior=want)
    assert torch.equal(mine.combined, hand.combined)
    assert torch.equal(mine.weights, model.pose_weights(hand.per_pose, hand.index, prior=want))
    if masked:
        assert (mine.weights[torch.tensor([k for keep in KEEP for k in keep]) == 0] == 0).all()


def test_energy_divides_by_prior_kt_and_counts_from_the_lowest_pose(tmp_path: Path) -> None:
    keys = ["prior.field=score", "prior.kind=energy", "prior.kT=2.5"]
    data = load_data(_config(_file(tmp_path), *keys), for_prediction=True)
    for got, want in zip(log_priors(data.train) or [], _by_hand("energy", False, 2.5), strict=True):
        assert torch.equal(got, want) and float(got.max()) == 0.0


def test_an_energy_counts_from_the_lowest_pose_kept(tmp_path: Path) -> None:
    """c2's lowest score (-9.9) is masked: it must not lower the other poses' weights."""
    keys = ["prior.field=score", "prior.kind=energy", "mask.field=keep"]
    data = load_data(_config(_file(tmp_path), *keys), for_prediction=True)
    for got in log_priors(data.train) or []:
        assert float(got.max()) == 0.0
    smooth_min = combframe.create_combination("max", pred_scale=1.0).double()
    flat = torch.zeros(4, dtype=torch.float64)
    (c2,) = [c for c in data.train if c.name == "c2"]
    mask = torch.tensor(KEEP[2]) != 0
    want = smooth_min.value(flat[mask], prior=c2.prior[mask])  # the masked pose left out
    torch.testing.assert_close(smooth_min.value(flat, prior=c2.prior), want, rtol=0, atol=1e-15)


def test_training_evaluation_and_predict_use_the_saved_prior(tmp_path: Path) -> None:
    path = _file(tmp_path)
    keys = ["prior.field=score", "prior.kind=energy", "mask.field=keep", "test_fraction=0.34"]
    config = _config(path, *keys, "combination.name=mean")
    (tmp_path / "run").mkdir()
    result = train(config, progress=False, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "model.json").read_text())["config"]
    assert saved["prior"] == {"field": "score", "kind": "energy", "kT": 0.593}
    assert saved["mask"] == {"field": "keep"}
    model = load(tmp_path / "run")
    compounds = load_data(_config(path), for_prediction=True).train  # no prior read
    poses = [list(c.poses) for c in compounds]
    with torch.no_grad():
        want = model(compounds=poses, prior=_by_hand("energy", True)).combined
        plain = model(compounds=poses).combined
    got = predict_file(tmp_path / "run").predictions  # reads the data with the run's prior
    assert torch.equal(got.combined, want) and not torch.equal(got.combined, plain)
    test = load_data(config).test  # the held-out compound, with its prior
    with torch.no_grad():
        held_out = model(compounds=[list(c.poses) for c in test], prior=log_priors(test))
    assert result.metrics["test"]["rmse"] == pytest.approx(
        float((held_out.combined - torch.stack([c.target for c in test])).abs().max())
    )


def test_an_ensemble_of_runs_with_other_priors_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path)
    for name, keys in (("a", ["prior.field=score"]), ("b", [])):
        (tmp_path / name).mkdir()
        train(_config(path, *keys), progress=False, run_dir=tmp_path / name)
    with pytest.raises(ConfigError, match=r"other prior\.\* or mask\.\* settings"):
        predict_file([tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize(
    ("keys", "change", "message"),
    [
        (
            ["prior.field=scores"],
            {},
            "prior.field: compound 'c0' has no pose field 'scores' (its pose fields: keep, "
            "prob, score); did you mean 'score'?",
        ),
        (
            ["prior.field=score"],
            {"c1": {"score": [-6.0, None]}},
            "prior.field: pose 1 of compound 'c1': the field 'score' has no value; every "
            "pose needs a finite number",
        ),
        (
            ["prior.field=score"],
            {"c2": {"score": [0.0, math.inf, 1.0, 2.0]}},
            "prior.field: pose 1 of compound 'c2': the field 'score' is inf",
        ),
        (
            ["prior.field=prob", "prior.kind=probability"],
            {"c1": {"prob": [0.5, 0.0]}},
            "prior.kind: pose 1 of compound 'c1': prob is 0, not a probability in (0, 1]",
        ),
        (
            ["prior.field=prob", "prior.kind=probability"],
            {"c0": {"prob": [0.5, 1.5, 1.0]}},
            "prior.kind: pose 1 of compound 'c0': prob is 1.5, not a probability in (0, 1]",
        ),
        (
            ["mask.field=keep"],
            {"c1": {"keep": [0, 0]}},
            "mask.field: every pose of compound 'c1' has keep = 0; keep at least one",
        ),
        (
            ["mask.field=keep"],
            {"c1": {"keep": [1, 0.5]}},
            "mask.field: pose 1 of compound 'c1': keep is 0.5, not 0 or 1: a mask keeps (1) "
            "or drops (0) a pose; for fractional weights use prior.field=keep",
        ),
        (
            ["prior.field=mmff_energy", "prior.kind=energy"],
            {},
            "prior.field: compound 'c0' has no pose field 'mmff_energy' (its pose fields: "
            "keep, prob, score); generated conformers have it with reader.minimize=true",
        ),
    ],
)
def test_bad_pose_fields_are_refused_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keys: list[str],
    change: dict[str, Any],
    message: str,
) -> None:
    path = _file(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_data(_config(path, *keys))
    assert message in str(err.value), str(err.value)
    args = ["train", "--no-progress", f"data={path}", *FAST, *keys, f"output_dir={tmp_path}"]
    assert main(args) == 2
    assert f"combframe train: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_synthetic_set_has_no_pose_fields() -> None:
    with pytest.raises(ConfigError, match="built-in synthetic set has no pose fields"):
        load_data(load_config(None, ["prior.field=score", "compounds=4"]))


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ([1, 2], "'properties' must map names to lists of one number per pose"),
        ({"s": [1.0]}, "properties['s'] must be a list of 3 numbers (one per pose"),
        ({"s": [1.0, "x", 2.0]}, "properties['s'] holds something other than numbers"),
    ],
)
def test_bad_json_pose_fields_name_the_compound(
    tmp_path: Path, properties: Any, message: str
) -> None:
    path = _file(tmp_path)
    text = json.loads(path.read_text())
    text["compounds"][0]["properties"] = properties
    path.write_text(json.dumps(text))
    with pytest.raises(ConfigError, match="compounds\\[0\\] \\('c0'\\)") as err:
        load_data(_config(path))
    assert message in str(err.value)


class _NoPrior(combframe.Combination):
    """A mean that takes no per-pose prior."""

    name = "no_prior_mean"

    def value(self, preds: Tensor) -> Tensor:
        return preds.mean()


@pytest.mark.parametrize("key", ["prior.field=score", "mask.field=keep"])
def test_a_combination_without_priors_refuses_the_field_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    path = _file(tmp_path)
    with isolated_registry():
        register_plugin(_NoPrior)
        args = ["train", f"data={path}", *FAST, key, "combination.name=no_prior_mean"]
        assert main([*args, "strategy=store", f"output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    field = key.partition("=")[0]
    assert err.startswith(
        f"combframe train: error: {field}: combination 'no_prior_mean' takes no per-pose "
        "prior or mask"
    ), err
    assert "(max, mean, boltzmann)" in err
    assert not (tmp_path / "runs").exists()


def _energy_prior(values: Tensor, kT: float = 0.593) -> Tensor:
    return -(values - values.min()) / kT


def test_sd_properties_of_an_sdf_and_a_manifest_are_pose_fields(tmp_path: Path) -> None:
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    from tests.test_app_readers import _cmet

    sdf = _cmet(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"compound,value,poses\nc0,-7,{sdf.name}\nc1,-8,{sdf.name}\n")
    keys = [f"reader.cache_dir={tmp_path / 'cache'}", "prior.field=docking_score"]
    keys += ["prior.kind=energy", "combination.name=boltzmann"]
    for data, extra in (
        (sdf, ["reader.group_by=series", "reader.target=r_exp_dg"]),
        (manifest, []),
    ):
        compounds = load_data(_config(data, *keys, *extra), for_prediction=True).train
        assert [len(c.poses) for c in compounds] == ([2, 2] if data == sdf else [4, 4])
        for c in compounds:
            assert c.properties is not None and c.prior is not None
            assert torch.equal(c.prior, _energy_prior(c.properties["docking_score"]))


def test_minimised_conformers_carry_their_mmff_energy(tmp_path: Path) -> None:
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")
    from tests.test_app_readers import _smiles

    smi, values = _smiles(tmp_path, count=2)
    keys = [f"reader.values={values}", "reader.conformers=3", "reader.minimize=true"]
    keys += [f"reader.cache_dir={tmp_path / 'cache'}", "prior.field=mmff_energy"]
    keys += ["prior.kind=energy", "combination.name=boltzmann"]
    for _ in range(2):  # read, then from the cache
        compounds = load_data(_config(smi, *keys), for_prediction=True).train
        for c in compounds:
            energy = (c.properties or {})["mmff_energy"]
            assert energy.shape == (len(c.poses),) and float(energy.min()) == 0.0
            assert bool((energy >= 0).all()) and float(energy.max()) > 0
            assert c.prior is not None and torch.equal(c.prior, _energy_prior(energy))
    plain = [k for k in keys if k not in ("reader.minimize=true",)]
    with pytest.raises(ConfigError, match=r"with reader\.minimize=true"):
        load_data(_config(smi, *plain))


def test_a_combination_of_the_wrong_shape_is_refused_as_a_combination_not_a_prior(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-pooling combination that does not turn one value per pose into one."""

    class Pairs(combframe.Combination[combframe.CombinationParams]):
        name = "pairs"

        def value(self, preds: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
            return torch.stack([preds.min(0).values, preds.max(0).values])

    monkeypatch.setattr(combframe.CombinationConfig, "build", lambda self: Pairs())
    args = ["train", f"data={_file(tmp_path)}", *FAST, "prior.field=score"]
    assert main([*args, f"output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "combframe train: error: combination: 'pairs' does not combine one value per pose "
        "into as many (it returns shape (2,))"
    ), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gated_attention_trains_on_a_field_prior_reproducibly(tmp_path: Path, dtype: str) -> None:
    """Its own layers follow the run's dtype and seed: two runs give the same weights."""
    keys = ["prior.field=score", "combination.name=gated_attention", "combination.dim=1"]
    keys += ["combination.hidden=3", "test_fraction=0.34"]
    fast = [k for k in FAST if not k.startswith("dtype=")] + [f"dtype={dtype}"]
    config = load_config(None, [f"data={_file(tmp_path)}", *fast, *keys])
    states = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        train(config, progress=False, run_dir=tmp_path / name)
        states.append(load(tmp_path / name).state_dict())
    weights = [
        k for k, v in states[0].items() if k.startswith("combination.") and k[-5:] != "state"
    ]
    assert "combination.V.weight" in weights
    assert states[0]["combination.V.weight"].dtype == getattr(torch, dtype)
    for key in weights:
        assert torch.equal(states[0][key], states[1][key]), key
