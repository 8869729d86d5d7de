"""Migration from mtenn-style model-config fields to CombinationConfig."""

from __future__ import annotations

import enum

import pytest
import torch
import yaml
from pydantic import BaseModel, Field

import combframe
from combframe import CombinationConfig, CombinationError, UnknownCombinationError
from combframe.mtenn import mtenn_fields
from tests.conftest import make_mlp, make_poses


class MtennCombination(str, enum.Enum):
    """The string enum mtenn uses for ``combination``."""

    mean = "mean"
    max = "max"


class MtennModelConfig(BaseModel):
    """The combination-related fields of an mtenn model config, with mtenn's defaults."""

    grouped: bool = True
    combination: MtennCombination | None = None
    max_comb_neg: bool = True
    max_comb_scale: float = Field(1000)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"combination": "mean"}, {"name": "mean"}),
        (
            {"combination": "mean", "max_comb_neg": False, "max_comb_scale": 3.0},
            {"name": "mean"},
        ),
        ({"combination": "max"}, {"name": "max", "negate_preds": True, "pred_scale": 1000.0}),
        (
            {"combination": "max", "max_comb_neg": False, "max_comb_scale": 25},
            {"name": "max", "negate_preds": False, "pred_scale": 25.0},
        ),
        ({"combination": "MAX"}, {"name": "max", "negate_preds": True, "pred_scale": 1000.0}),
        ({"combination": "boltzmann"}, {"name": "boltzmann", "kT": 1.0}),
        ({"combination": "boltzmann", "boltzmann_comb_kT": 0.6}, {"name": "boltzmann", "kT": 0.6}),
        (
            {"combination": {"name": "max", "pred_scale": 4}},
            {"name": "max", "negate_preds": True, "pred_scale": 4.0},
        ),
    ],
)
def test_mapping_fields_migrate(fields: dict[str, object], expected: dict[str, object]) -> None:
    config = combframe.from_mtenn_config(fields)
    assert isinstance(config, CombinationConfig)
    assert config.model_dump() == expected


@pytest.mark.parametrize("fields", [{}, {"combination": None}, {"max_comb_scale": 3.0}])
def test_no_combination_means_none(fields: dict[str, object]) -> None:
    assert combframe.from_mtenn_config(fields) is None


@pytest.mark.parametrize("member", list(MtennCombination))
def test_mtenn_config_object_with_enum(member: MtennCombination) -> None:
    old = MtennModelConfig(combination=member, max_comb_neg=False, max_comb_scale=50)
    config = combframe.from_mtenn_config(old)
    assert config is not None
    assert config.name == member.value
    if member is MtennCombination.max:
        assert config.model_dump() == {"name": "max", "negate_preds": False, "pred_scale": 50.0}
    # the same result from the dumped YAML of the old config
    text = yaml.safe_dump(old.model_dump(mode="json"))
    assert combframe.from_mtenn_config(yaml.safe_load(text)) == config


def test_migrated_model_matches_a_directly_built_one() -> None:
    old = {"combination": "max", "max_comb_neg": True, "max_comb_scale": 10.0}
    config = combframe.from_mtenn_config(old)
    net = make_mlp(seed=2)
    poses = make_poses(5, seed=2)
    migrated = combframe.MultiPoseModel(net, config)(poses)
    direct = combframe.MultiPoseModel(
        net, combframe.create_combination("max", negate_preds=True, pred_scale=10.0)
    )(poses)
    for a, b in zip(migrated, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (
            {"combination": "max", "max_comb_scale": -1},
            "max_comb_scale (-> pred_scale): Input should be greater than 0 (got -1)",
        ),
        (
            {"combination": "boltzmann", "boltzmann_comb_kT": 0},
            "boltzmann_comb_kT (-> kT): Input should be greater than 0 (got 0)",
        ),
        ({"combination": 3}, "must be a combination name such as 'max'; got 3"),
    ],
)
def test_bad_fields_name_the_mtenn_field(fields: dict[str, object], text: str) -> None:
    with pytest.raises(CombinationError) as info:
        combframe.from_mtenn_config(fields)
    assert text in str(info.value)


def test_unknown_mtenn_combination_suggests() -> None:
    with pytest.raises(UnknownCombinationError, match="Did you mean 'mean'"):
        combframe.from_mtenn_config({"combination": "meen"})


def test_migrate_mtenn_config_rewrites_the_mapping() -> None:
    old = {
        "grouped": True,
        "combination": "max",
        "max_comb_neg": False,
        "max_comb_scale": 20,
        "pred_readout": None,
    }
    new = combframe.migrate_mtenn_config(old)
    assert new == {
        "grouped": True,
        "combination": {"name": "max", "negate_preds": False, "pred_scale": 20.0},
        "pred_readout": None,
    }
    assert old["combination"] == "max"  # the input is not modified
    assert combframe.migrate_mtenn_config({"combination": None, "max_comb_neg": True}) == {
        "combination": None
    }
    assert combframe.migrate_mtenn_config({"lr": 0.1}) == {"lr": 0.1}
    # the migrated mapping validates as a CombinationConfig field
    assert CombinationConfig.model_validate(new["combination"]).build().pred_scale == 20.0


def test_parameter_field_table_matches_the_plugins() -> None:
    declared = mtenn_fields()
    assert declared == {
        "max": {"max_comb_neg": "negate_preds", "max_comb_scale": "pred_scale"},
        "boltzmann": {"boltzmann_comb_kT": "kT"},
    }
    for name, fields in declared.items():
        params = combframe.get_combination_class(name).Params.model_fields
        assert set(fields.values()) <= set(params), name
