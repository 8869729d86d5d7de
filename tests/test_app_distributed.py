"""``combframe train`` under ``torchrun``: two gloo processes on CPU match one process.

The two processes share out every batch and the evaluation sets, the model is wrapped in
DistributedDataParallel and the metrics are reduced over the ranks; in float64 every
number of the run must equal that of one process to rounding, and only rank 0 writes.
The batch size leaves a last batch of one compound, so one rank takes part in that step
without compounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from combframe.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
#: 33 compounds: 25 train in batches of 8, 8, 8 and 1; 8 held out.
SETTINGS = ["epochs=2", "compounds=33", "dtype=float64", "hidden=16", "--no-progress"]


def _runs(top: Path) -> dict[str, dict[str, Any]]:
    table = json.loads((top / "compare.json").read_text())
    return {
        row["run"]: json.loads((Path(row["run_dir"]) / "metrics.json").read_text()) for row in table
    }


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    compare = ["--compare", "strategy=store,stream"]
    assert main(["train", *compare, *SETTINGS, f"output_dir={tmp_path}", "name=one"]) == 0
    capsys.readouterr()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    where = [f"output_dir={tmp_path / 'two'}", "name=two"]
    proc = subprocess.run(
        [*torchrun, "-m", "combframe", "train", *compare, *SETTINGS, *where],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("held-out metrics") == 1, "rank 0 alone prints:\n" + proc.stdout
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["two"], "one run folder"
    one, two = _runs(tmp_path / "one"), _runs(tmp_path / "two" / "two")
    assert list(one) == list(two) == ["strategy=store", "strategy=stream"]
    for run in one:
        a, b = one[run], two[run]
        assert (a["processes"], b["processes"]) == (1, 2)
        for key in ("rmse", "pearson", "spearman"):
            assert _same(a["test"][key], b["test"][key]), (run, key, a["test"], b["test"])
        assert _same(a["train"]["rmse"], b["train"]["rmse"])
        for x, y in zip(a["history"], b["history"], strict=True):
            assert _same(x["train_rmse"], y["train_rmse"]), (run, a["history"], b["history"])
            assert _same(x["test_rmse"], y["test_rmse"]), (run, a["history"], b["history"])
