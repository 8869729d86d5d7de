"""A MultiPoseModel's state_dict carries its combination: name and parameters, checked on
load, safe for ``torch.load(weights_only=True)``, and old state_dicts still load."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

import combframe
from combframe.testing import isolated_registry
from tests.conftest import make_mlp, make_poses
from tests.example_plugin import install_example_plugin

KEY = "combination._extra_state"


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """Save with torch.save and load back with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def plain(value: Any) -> bool:
    """Whether ``value`` is made of dicts, lists, strings, numbers, bools and None only."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "boltzmann", "kT": 0.5},
        {"name": "max", "negate_preds": False, "pred_scale": 3.0},
        {"name": "mean"},
    ],
)
def test_state_dict_round_trip_keeps_the_combination(spec: dict[str, Any]) -> None:
    model = combframe.MultiPoseModel(make_mlp(seed=1), spec)
    state = model.state_dict()
    name = spec["name"]
    assert state[KEY] == {"name": name, "params": {k: v for k, v in spec.items() if k != "name"}}
    assert plain(state[KEY])
    other = combframe.MultiPoseModel(make_mlp(seed=2), spec)
    result = other.load_state_dict(roundtrip(state))
    assert not result.missing_keys and not result.unexpected_keys
    poses = make_poses(4)
    with torch.no_grad():
        assert torch.equal(model(poses)[0], other(poses)[0])


def test_loading_another_temperature_is_an_error_and_changes_nothing() -> None:
    saved = combframe.MultiPoseModel(make_mlp(seed=1), {"name": "boltzmann", "kT": 0.5})
    model = combframe.MultiPoseModel(make_mlp(seed=2), "boltzmann")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(combframe.CombinationError) as info:
        model.load_state_dict(roundtrip(saved.state_dict()))
    message = str(info.value)
    assert "kT=0.5" in message and "kT=1.0" in message
    assert "MultiPoseModel(model, {'name': 'boltzmann', 'kT': 0.5})" in message
    assert model.combination.kT == 1.0
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights were loaded anyway"


def test_loading_another_combination_is_an_error() -> None:
    saved = combframe.MultiPoseModel(make_mlp(), {"name": "max", "pred_scale": 10.0})
    with pytest.raises(combframe.CombinationError, match=r"saved with combination 'max'.*'mean'"):
        combframe.MultiPoseModel(make_mlp(), "mean").load_state_dict(saved.state_dict())
    with pytest.raises(combframe.CombinationError, match=r"pred_scale=10.0.*pred_scale=1000.0"):
        combframe.MultiPoseModel(make_mlp(), "max").load_state_dict(
            saved.state_dict(), strict=False
        )


def test_state_dict_without_the_combination_still_loads() -> None:
    """state_dicts written before the combination was saved with the model."""
    saved = combframe.MultiPoseModel(make_mlp(seed=1), {"name": "boltzmann", "kT": 0.5})
    old = {k: v for k, v in saved.state_dict().items() if k != KEY}
    model = combframe.MultiPoseModel(make_mlp(seed=2), {"name": "boltzmann", "kT": 0.5})
    result = model.load_state_dict(roundtrip(old))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.model[0].weight, saved.model[0].weight)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ("boltzmann", "not a mapping"),
        ({"name": "boltzmann"}, "not a mapping"),
        ({"name": "boltzmann", "params": {"kT": 1.0, "beta": 2.0}}, "'beta'.*does not know"),
    ],
)
def test_malformed_combination_state_is_refused(state: Any, match: str) -> None:
    model = combframe.MultiPoseModel(make_mlp(), "boltzmann")
    with pytest.raises(combframe.CombinationError, match=match):
        model.load_state_dict({**model.state_dict(), KEY: state})


def test_combination_alone_and_learnt_parameters() -> None:
    comb = combframe.create_combination("max", pred_scale=5.0)
    assert comb.state_dict() == {"_extra_state": comb.get_extra_state()}
    comb.load_state_dict(roundtrip(comb.state_dict()))
    with pytest.raises(combframe.CombinationError, match=r"pred_scale=5.0"):
        combframe.create_combination("max").load_state_dict(comb.state_dict())


def test_third_party_plugin_gets_it_without_code(tmp_path: Path) -> None:
    with isolated_registry(), install_example_plugin(tmp_path):
        saved = combframe.MultiPoseModel(make_mlp(), {"name": "blend", "alpha": 0.25})
        state = roundtrip(saved.state_dict())
        assert state[KEY] == {"name": "blend", "params": {"alpha": 0.25, "pred_scale": 10.0}}
        combframe.MultiPoseModel(
            make_mlp(), {"name": "mean-min-blend", "alpha": 0.25}
        ).load_state_dict(state)
        with pytest.raises(combframe.CombinationError, match=r"alpha=0.25.*alpha=0.5"):
            combframe.MultiPoseModel(make_mlp(), "blend").load_state_dict(state)
