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


#: Rank 1 alone receives SIGTERM after its third step; rank 0 must stop at the same step.
_SIGTERM_ON_RANK_1 = """
import os, signal, sys
import combframe.app.train as train
from combframe.app.cli import main

real_step, count = train._step, [0]
def step(*args):
    loss = real_step(*args)
    count[0] += 1
    if count[0] == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return loss
train._step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_under_torchrun_a_sigterm_stops_every_rank_and_every_rank_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    settings = ["compounds=21", "epochs=3", "hidden=4", "dtype=float64", "--no-progress"]
    assert main(["train", *settings, f"output_dir={tmp_path}", "name=one"]) == 0
    capsys.readouterr()
    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_ON_RANK_1)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    where = [f"output_dir={tmp_path}", "name=two"]
    proc = subprocess.run(
        [*torchrun, str(script), "train", *settings, *where],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "stopped by SIGTERM in epoch 2 after batch 1" in proc.stderr, proc.stderr
    resume = [*torchrun, "-m", "combframe", "train", "--resume", str(tmp_path / "two")]
    proc = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    for key in one:
        assert float((one[key] - two[key]).abs().max()) < 1e-12, key
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    for x, y in zip(a["history"], b["history"], strict=True):
        assert _same(x["train_rmse"], y["train_rmse"]), (a["history"], b["history"])
