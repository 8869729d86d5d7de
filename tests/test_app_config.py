"""``combframe train`` configuration: order-independent overrides and the keys in ``--help``."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from combframe.app.cli import main
from combframe.app.config import ConfigError, TrainConfig, apply_overrides, load_config

TINY = ["epochs=1", "compounds=12", "poses_per_compound=3", "hidden=4", "--no-progress"]


@pytest.mark.parametrize(
    "overrides",
    list(itertools.permutations(["combination.kT=0.6", "combination.name=boltzmann", "epochs=2"])),
)
def test_overrides_do_not_depend_on_their_order(overrides: tuple[str, ...]) -> None:
    config = load_config(None, overrides)
    assert config.combination.model_dump() == {"name": "boltzmann", "kT": 0.6}
    assert config.epochs == 2


def test_explicit_parameter_before_the_name_trains_with_it(tmp_path: Path) -> None:
    """The issue's command: kT=0.6 given before the name used to be dropped for kT=1.0."""
    args = ["train", "combination.kT=0.6", "combination.name=boltzmann", *TINY]
    assert main([*args, f"output_dir={tmp_path}", "name=run"]) == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["combination"] == {"name": "boltzmann", "kT": 0.6}


def test_file_parameters_reset_on_a_new_name_but_explicit_ones_stay(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("combination: {name: boltzmann, kT: 0.5}\n")
    config = load_config(path, ["combination.pred_scale=7", "combination.name=max"])
    assert config.combination.model_dump() == {
        "name": "max",
        "negate_preds": True,
        "pred_scale": 7.0,
    }
    same = load_config(path, ["combination.name=Boltzmann"])
    assert same.combination.model_dump() == {"name": "boltzmann", "kT": 0.5}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["combination.kT=0.6"], "combination.kT"),
        (["combination.kT=0.6", "combination.name=max"], "combination.kT"),
        (["combination.name=mean", "combination.pred_scale=2"], "combination.pred_scale"),
    ],
)
def test_a_parameter_the_final_combination_lacks_is_an_error(
    overrides: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for order in (overrides, overrides[::-1]):
        assert main(["train", *TINY, f"output_dir={tmp_path}", *order]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err, err
        assert "not a parameter of this combination" in err, err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epochs=2", "epochs=3"], "epochs is given twice"),
        (["combination={name: mean}", "combination.name=max"], "overlap"),
    ],
)
def test_conflicting_overrides_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides({}, overrides)


def test_repeating_an_override_with_the_same_value_is_fine() -> None:
    assert apply_overrides({}, ["epochs=2", "epochs=2.0"]) == {"epochs": 2}


def test_train_help_lists_every_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    flat = re.sub(r"\s+", " ", out)
    assert "config keys" in out
    for name, info in TrainConfig.model_fields.items():
        match = re.search(rf"^  {name}=(\S+)", out, re.MULTILINE)
        assert match is not None, f"{name} is not listed in train --help:\n{out}"
        assert info.description is not None
        assert info.description in flat, f"description of {name} missing"
    for row in (
        "epochs=int",
        "Passes over the training compounds. (default: 10; >= 1)",
        "strategy=store|recompute|stream",
        "(default: auto)",
        "threads=int or null",
        "data=path or null",
        "(default: max, negate_preds=true)",
    ):
        assert row in flat, f"{row!r} not in train --help"


@pytest.mark.parametrize("given", ["Stream", " STREAM ", "stream"])
def test_strategy_names_are_not_case_sensitive(given: str) -> None:
    # MultiPoseModel(strategy="Stream") is accepted; the config used to refuse it
    assert load_config(None, [f"strategy={given}"]).strategy == "stream"


def test_an_unknown_strategy_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        load_config(None, ["strategy=streamed"])
