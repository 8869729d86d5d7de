"""CombinationConfig: validation against the plugin, round trips, schema, user configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import combframe
from combframe import CombinationConfig, CombinationError
from combframe.testing import (
    full_graph_gradients,
    isolated_registry,
    make_loss,
    multipose_gradients,
    register_plugin,
)
from tests.conftest import make_mlp, make_poses
from tests.example_plugin import install_example_plugin
from tests.test_registry import Soft


class TrainConfig(BaseModel):
    """A user's own model config with a combination field."""

    combination: CombinationConfig
    strategy: str = "store"
    lr: float = 1e-3

    def build(self, net: torch.nn.Module) -> combframe.MultiPoseModel:
        return combframe.MultiPoseModel(net, self.combination, strategy=self.strategy)


YAML = """
combination:
  name: max
  pred_scale: 100
strategy: recompute
"""


def _errors(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    return [(e["loc"], e["type"]) for e in exc.errors()]


def test_yaml_config_builds_the_model_with_exact_gradients() -> None:
    config = TrainConfig.model_validate(yaml.safe_load(YAML))
    assert config.combination.model_dump() == {
        "name": "max",
        "negate_preds": True,
        "pred_scale": 100.0,
    }
    net = make_mlp(seed=1)
    model = config.build(net)
    assert isinstance(model.combination, combframe.create_combination("max").__class__)
    assert model.combination.pred_scale == 100.0
    poses = make_poses(4, seed=1)
    loss = make_loss("both")
    want = full_graph_gradients(make_mlp(seed=1), model.combination, poses, loss)
    got = multipose_gradients(net, model.combination, poses, loss, strategy="recompute")
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("edit", "loc", "kind", "text"),
    [
        ("pred_scale: -1", ("combination", "pred_scale"), "greater_than", "greater than 0"),
        ("pred_scale: 0", ("combination", "pred_scale"), "greater_than", "greater than 0"),
        ("pred_scale: fast", ("combination", "pred_scale"), "float_parsing", "valid number"),
        ("pred_scal: 10", ("combination", "pred_scal"), "extra_forbidden", "Extra inputs"),
        ("kT: 1.0", ("combination", "kT"), "extra_forbidden", "Extra inputs"),
    ],
)
def test_bad_parameter_is_a_pydantic_error_naming_the_field(
    edit: str, loc: tuple[str, ...], kind: str, text: str
) -> None:
    bad = YAML.replace("pred_scale: 100", edit)
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate(yaml.safe_load(bad))
    assert _errors(info.value) == [(loc, kind)]
    assert ".".join(map(str, loc)) in str(info.value)
    assert text in str(info.value)


def test_unknown_or_missing_name_is_reported_on_the_name_field() -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"combination": {"name": "boltzman", "kT": 2.0}})
    assert _errors(info.value) == [(("combination", "name"), "unknown_combination")]
    assert "Did you mean 'boltzmann'?" in str(info.value)
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"combination": {"pred_scale": 2.0}})
    assert _errors(info.value) == [(("combination", "name"), "missing_combination_name")]
    assert f"installed: {', '.join(combframe.list_combinations())}" in str(info.value)
    with pytest.raises(ValidationError) as info:
        CombinationConfig.model_validate({"name": 7})
    assert _errors(info.value) == [(("name",), "string_type")]
    with pytest.raises(ValidationError, match="mapping with a 'name' key"):
        TrainConfig.model_validate({"combination": ["max"]})


def test_config_is_frozen() -> None:
    config = CombinationConfig(name="max")
    with pytest.raises(ValidationError, match="frozen"):
        config.name = "mean"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["boltzmann", "max", "mean"])
def test_every_shipped_combination_round_trips(name: str) -> None:
    comb = combframe.create_combination(name)
    config = CombinationConfig.from_combination(comb)
    assert config.model_dump() == comb.to_config()
    assert CombinationConfig.model_validate_json(config.model_dump_json()) == config
    assert CombinationConfig.from_yaml(config.to_yaml()) == config
    assert config.to_yaml().startswith(f"name: {name}\n")
    rebuilt = config.build()
    assert type(rebuilt) is type(comb)
    assert rebuilt.params == comb.params
    assert config.params == comb.params
    # a combination module is accepted where a config is expected
    assert TrainConfig(combination=comb).combination == config  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    negate=st.booleans(),
)
def test_max_parameters_round_trip_exactly(scale: float, negate: bool) -> None:
    config = CombinationConfig(name="MAX", pred_scale=scale, negate_preds=negate)
    assert config.name == "max"
    assert CombinationConfig.model_validate_json(config.model_dump_json()) == config
    assert CombinationConfig.from_yaml(config.to_yaml()) == config
    comb = config.build()
    assert (comb.pred_scale, comb.negate_preds) == (scale, negate)


@settings(max_examples=25, deadline=None)
@given(kT=st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
def test_non_positive_kt_is_rejected(kT: float) -> None:
    with pytest.raises(ValidationError) as info:
        CombinationConfig(name="boltzmann", kT=kT)
    assert _errors(info.value) == [(("kT",), "greater_than")]


def test_user_config_round_trips_through_json_and_yaml() -> None:
    config = TrainConfig.model_validate(yaml.safe_load(YAML))
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    assert TrainConfig.model_validate(yaml.safe_load(text)) == config


def test_aliases_normalize_and_deprecated_alias_warns() -> None:
    with isolated_registry():
        register_plugin(Soft)
        config = CombinationConfig(name="Gentle-Min", scale=3)
        assert config.model_dump() == {"name": "soft_min", "scale": 3.0}
        with pytest.warns(FutureWarning, match="use 'soft_min'"):
            old = CombinationConfig.model_validate({"name": "oldsoft"})
        assert old.name == "soft_min"
        assert isinstance(old.build(), Soft)


def test_create_combination_accepts_every_form() -> None:
    max_comb = combframe.create_combination("max", pred_scale=5.0)
    forms = [
        max_comb,
        CombinationConfig(name="max", pred_scale=5.0),
        {"name": "max", "pred_scale": 5.0},
    ]
    for form in forms:
        resolved = combframe.create_combination(form)
        assert resolved.to_config() == max_comb.to_config()
    assert combframe.create_combination(max_comb) is max_comb
    assert combframe.create_combination("mean").to_config() == {"name": "mean"}
    with pytest.raises(CombinationError, match=r"needs a 'name' key.*got keys \['pred_scale'\]"):
        combframe.create_combination({"pred_scale": 5.0})
    with pytest.raises(ValidationError, match="pred_scale"):
        combframe.create_combination({"name": "max", "pred_scale": -5.0})
    with pytest.raises(TypeError, match="got int"):
        combframe.create_combination(3)


# ---- schema -------------------------------------------------------------------------------


def _variants(schema: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    defs = schema["$defs"]
    mapping = schema["discriminator"]["mapping"]
    assert schema["discriminator"]["propertyName"] == "name"
    assert len(schema["oneOf"]) == len(defs)
    return {name: defs[ref.rsplit("/", 1)[1]] for name, ref in mapping.items()}


def test_schema_covers_every_installed_combination(tmp_path: Path) -> None:
    schema = combframe.combination_config_schema()
    json.dumps(schema)  # plain JSON
    variants = _variants(schema)
    aliases = [a for i in combframe.describe_combinations() for a in i.aliases]
    assert sorted(variants) == sorted([*combframe.list_combinations(), *aliases])
    max_props = variants["max"]["properties"]
    assert max_props["pred_scale"] == {
        "default": 1000.0,
        "description": "Sharpness t; larger is closer to max.",
        "exclusiveMinimum": 0,
        "title": "Pred Scale",
        "type": "number",
    }
    assert max_props["name"]["const"] == "max"
    assert variants["max"]["additionalProperties"] is False
    assert set(variants["mean"]["properties"]) == {"name"}
    for info in combframe.describe_combinations():
        props = variants[info.name]["properties"]
        learn = {"learn"} if any(p.type == "float" for p in info.parameters) else set()
        assert set(props) == {"name"} | learn | {p.name for p in info.parameters}

    shipped = sorted(variants)
    with isolated_registry(), install_example_plugin(tmp_path):
        variants = _variants(combframe.combination_config_schema())
        assert sorted(variants) == sorted([*shipped, "blend", "mean_min_blend"])
        assert variants["blend"] is variants["mean_min_blend"]
        alpha = variants["blend"]["properties"]["alpha"]
        assert (alpha["minimum"], alpha["maximum"], alpha["default"]) == (0, 1, 0.5)
        assert "mixmin" not in variants  # deprecated names are accepted, not advertised


def test_user_model_schema_embeds_the_union() -> None:
    schema = TrainConfig.model_json_schema()
    field = schema["properties"]["combination"]
    ref = field["$ref"].rsplit("/", 1)[1]
    union = schema["$defs"][ref]
    names = {n for i in combframe.describe_combinations() for n in (i.name, *i.aliases)}
    assert set(union["discriminator"]["mapping"]) == names
    for target in union["discriminator"]["mapping"].values():
        assert target.rsplit("/", 1)[1] in schema["$defs"]


def test_schema_with_one_or_no_combination() -> None:
    with isolated_registry(autoload=False):
        register_plugin(Soft)
        schema = combframe.combination_config_schema()
        assert schema["properties"]["name"]["enum"] == ["soft_min", "gentle_min"]
    with isolated_registry(autoload=False), pytest.raises(combframe.UnknownCombinationError):
        combframe.combination_config_schema()
