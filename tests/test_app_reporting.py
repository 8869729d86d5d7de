"""What the app says about a run: refused keys that would do nothing, the first compound
in file order named, learned combination parameters reported with their final values,
run folders whose paths work from any folder, and molecules MMFF94 cannot minimise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from combframe.app.cli import main
from combframe.app.config import SYNTHETIC_KEYS, ConfigError, load_config, saved_config
from combframe.app.predict import load
from combframe.app.train import load_data
from tests.test_app_priors import FAST, _file

# ---- keys that would be ignored ---------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (["prior.kind=energy"], "prior.kind"),
        (["prior.kT=0.3"], "prior.kT"),
        (["prior.kind=probability", "prior.kT=2", "prior.field=null"], "prior.kind, prior.kT"),
    ],
)
def test_prior_settings_without_prior_field_are_refused(keys: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, keys)
    message = str(err.value)
    assert f"{named} given without prior.field" in message, message
    assert "set prior.field=" in message


def test_a_saved_config_without_a_prior_loads_again() -> None:
    config = load_config(None, [])
    assert load_config(None, []).prior == config.prior
    dumped = config.model_dump(mode="json")  # every key, prior.kind and prior.kT too
    assert load_config(None, [f"prior={json.dumps(dumped['prior'])}"]).prior.field is None


# ---- the first compound in file order ---------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_a_missing_field_names_the_first_compound_of_the_file(tmp_path: Path, seed: int) -> None:
    path = _file(tmp_path)
    config = load_config(None, [f"data={path}", *FAST, f"seed={seed}", "prior.field=absent"])
    with pytest.raises(ConfigError, match="compound 'c0' has no pose field 'absent'"):
        load_data(config)


# ---- what a run folder records ----------------------------------------------------------


def test_a_data_run_records_absolute_paths_and_no_synthetic_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    _file(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    args = ["train", "--no-progress", "data=compounds.json", *FAST, "name=r"]
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "a" / "runs" / "r" / "config.yaml").read_text())
    assert saved["data"] == str(tmp_path / "a" / "compounds.json")
    assert not set(SYNTHETIC_KEYS) & set(saved)
    assert "compounds" in saved_config(load_config(None, []))  # the built-in set keeps them
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "a" / "runs" / "r"), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4


def _chem() -> None:
    pytest.importorskip("rdkit")
    pytest.importorskip("torch_geometric")


def test_reader_values_is_found_from_another_folder_and_named_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _chem()
    from tests.test_app_readers import _smiles

    (tmp_path / "a").mkdir()
    smi, _ = _smiles(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    keys = ["reader.conformers=2", f"reader.cache_dir={tmp_path / 'cache'}", *FAST]
    args = ["train", "--no-progress", "data=series.smi", "reader.values=values.csv", *keys]
    assert main([*args, "name=r"]) == 0
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "a" / "runs" / "r"), f"data={smi}", "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["train", f"data={smi}", "reader.values=absent.csv", *keys]) == 2
    err = capsys.readouterr().err
    assert "error: reader.values: file 'absent.csv' does not exist" in err, err


# ---- learned combination parameters -----------------------------------------------------


def test_a_learned_kt_is_reported_with_its_final_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--no-progress", *FAST, "compounds=12", "lr=0.05"]
    args += ["combination.name=boltzmann", "combination.learn=[kT]", f"output_dir={tmp_path}"]
    assert main([*args, "name=r"]) == 0
    final = float(load(tmp_path / "r").combination.settings().kT)
    assert final != 1.0  # it was learned
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["combination"] == {"name": "boltzmann", "kT": final, "learn": ["kT"]}
    assert f"combination  boltzmann(kT={final:.5g} (learned))" in capsys.readouterr().out


def test_a_seeds_run_reports_each_seeds_learned_kt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--no-progress", *FAST, "compounds=12", "lr=0.05", "--seeds", "2"]
    args += ["combination.name=boltzmann", "combination.learn=[kT]", f"output_dir={tmp_path}"]
    assert main([*args, "name=s"]) == 0
    out = capsys.readouterr().out
    for seed in (0, 1):
        final = float(load(tmp_path / "s" / f"seed-{seed}").combination.settings().kT)
        assert f"  seed={seed} kT={final:.5g} (learned)  " in out, out


# ---- molecules MMFF94 cannot minimise ---------------------------------------------------


def _selenium_set(tmp_path: Path) -> list[str]:
    """Four SMILES, the first with selenium (no MMFF94 parameters), and their values."""
    (tmp_path / "se.smi").write_text("C[Se]CC selena\nCCO eth\nCCCO prop\nCCCCO but\n")
    (tmp_path / "se.csv").write_text("name,value\nselena,1\neth,2\nprop,3\nbut,4\n")
    return [
        f"data={tmp_path / 'se.smi'}",
        f"reader.values={tmp_path / 'se.csv'}",
        "reader.minimize=true",
        "reader.conformers=2",
        f"reader.cache_dir={tmp_path / 'cache'}",
        *FAST,
    ]


def test_a_molecule_mmff_cannot_minimise_is_named_skipped_or_noted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _chem()
    keys = _selenium_set(tmp_path)
    prior = ["prior.field=mmff_energy", "prior.kind=energy", "combination.name=boltzmann"]
    for _ in range(2):  # read, then from the cache
        with pytest.raises(ConfigError) as err:
            load_data(load_config(None, [*keys, *prior]))
        assert str(err.value) == (
            "prior.field: compound 'selena': MMFF94 has no parameters for it (Se); it was "
            "not minimised, so it has no mmff_energy; remove it from the input or use "
            "reader.skip_invalid=true"
        )
    data = load_data(load_config(None, [*keys, *prior, "reader.skip_invalid=true"]))
    names = {c.name for c in (*data.train, *data.test)}
    assert names == {"eth", "prop", "but"}
    assert data.skipped == (
        "compound 'selena': MMFF94 has no parameters for it (Se); it was not minimised, so "
        "it has no mmff_energy (prior.field)",
    )
    args = ["train", "--no-progress", *keys, f"output_dir={tmp_path}"]
    assert main([*args, *prior, "reader.skip_invalid=true"]) == 0
    assert "reader.skip_invalid left out 1 record(s)" in capsys.readouterr().err
    assert main(args) == 0  # no prior: trained unminimised, and said so
    assert (
        "note: 1 compound(s) have no mmff_energy; the first, 'selena': MMFF94 has no "
        "parameters for it (Se); it was not minimised"
    ) in capsys.readouterr().err


def test_only_the_molecule_mmff_cannot_minimise_is_marked(tmp_path: Path) -> None:
    _chem()
    data = load_data(load_config(None, _selenium_set(tmp_path)), for_prediction=True)
    marked = {c.name: dict(c.missing) for c in data.train if c.missing}
    assert list(marked) == ["selena"]
    assert marked["selena"] == {
        "mmff_energy": "MMFF94 has no parameters for it (Se); it was not minimised"
    }
