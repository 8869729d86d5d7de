"""``combframe train data=PATH``: the documented compounds file, read and refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from combframe.app.cli import main
from combframe.app.data import DataError, load_compounds, split_compounds

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "data" / "compounds.json"
QUICK = ["epochs=1", "--no-progress"]


def test_the_documented_example_file_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", f"data={EXAMPLE}", "epochs=40", "lr=0.01", "--no-progress"]
    assert main([*args, f"output_dir={tmp_path}", "name=mine"]) == 0
    out = capsys.readouterr().out
    assert "(15 compounds)" in out and "kcal/mol" not in out, out
    metrics = json.loads((tmp_path / "mine" / "metrics.json").read_text())
    assert metrics["data"] == {
        "source": str(EXAMPLE),
        "kind": "vectors",
        "features": 4,
        "skipped": 0,
    }
    assert metrics["train"]["compounds"] == 45
    assert metrics["test"]["pearson"] > 0.9, metrics["test"]


def test_reading_the_example() -> None:
    compounds = load_compounds(EXAMPLE, dtype=torch.float64)
    assert len(compounds) == 60
    first = compounds[0]
    assert first.name == "cpd-001" and first.poses.shape[1:] == (1, 4)
    assert first.poses.dtype == torch.float64 and first.target.shape == ()
    assert len({c.poses.shape[0] for c in compounds}) > 1, "pose counts vary"
    train, test = split_compounds(compounds, 0.25, seed=0)
    assert (len(train), len(test)) == (45, 15)
    names = [c.name for c in test]
    assert [c.name for c in split_compounds(compounds, 0.25, seed=0)[1]] == names
    assert [c.name for c in split_compounds(compounds, 0.25, seed=1)[1]] != names
    assert names == sorted(names), "each split keeps the file's order"


def _two(**first: Any) -> dict[str, Any]:
    good = {"name": "b", "value": -7.5, "poses": [[0.0, 1.0], [1.0, 0.5]]}
    return {"compounds": [{"name": "a", "value": -8.0, "poses": [[0.5, 0.5]], **first}, good]}


def _without(key: str) -> dict[str, Any]:
    data = _two()
    del data["compounds"][0][key]
    return data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_two(poses=[]), "compounds[0] ('a'): has no poses"),
        (_without("poses"), "compounds[0] ('a'): has no 'poses'"),
        (_without("value"), "compounds[0] ('a'): has no 'value'"),
        (_two(value=None), "compounds[0] ('a'): 'value' must be a number; got None"),
        (_two(value="-8"), "compounds[0] ('a'): 'value' must be a number"),
        (_two(value=float("nan")), "compounds[0] ('a'): 'value' is nan"),
        (_two(poses=[[1.0, 2.0], [1.0]]), "compounds[0] ('a'): pose 1 has 1 features, pose 0"),
        (_two(poses=[[1.0, 2.0, 3.0]]), "compounds[1] ('b'): pose 0 has 2 features; expected 3"),
        (_two(poses=[[1.0, float("inf")]]), "compounds[0] ('a'): pose 0 feature 1 is inf"),
        (_two(poses=[[1.0, "x"]]), "compounds[0] ('a'): pose 0 holds something other"),
        (_two(values=1.0), "compounds[0] ('a'): unknown key(s) ['values']"),
        (_two(name="b"), "compounds[1] ('b'): has the same name as compounds[0]"),
        ({"compounds": [{"value": 1.0, "poses": [[1.0]]}]}, "has 1 compound(s); training"),
        ([1, 2], "expected a JSON object with a 'compounds' list"),
    ],
)
def test_bad_compounds_files_name_the_compound_and_the_problem(
    content: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(content))  # NaN and Infinity as JSON writes them
    args = ["train", *QUICK, f"data={path}", f"output_dir={tmp_path / 'runs'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"combframe train: error: data: '{path}': "), err
    assert message in err, err
    assert not (tmp_path / "runs").exists(), "a refused file must not start a run"


@pytest.mark.parametrize(("text", "message"), [("{", "is not valid JSON: "), (None, "cannot read")])
def test_unreadable_files(text: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_compounds(path)


def test_a_compound_without_a_name_is_named_by_its_index(tmp_path: Path) -> None:
    path = tmp_path / "anonymous.json"
    data = {"compounds": [{"value": 1.0, "poses": [[1.0]]}, {"value": 2.0, "poses": []}]}
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r": compounds\[1\]: has no poses"):
        load_compounds(path)
