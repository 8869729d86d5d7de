"""Run folders that survive: checkpoints, resume after kill -9 or SIGTERM, failures kept."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from combframe.app import checkpoint, runs
from combframe.app.cli import main
from combframe.app.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
#: A tiny float64 run: a few hundredths of a second per epoch.
TINY = [
    "--no-progress",
    "compounds=16",
    "poses_per_compound=3",
    "hidden=4",
    "epochs=5",
    "batch_size=4",
    "dtype=float64",
    "plot=false",
]

#: Runs ``combframe train`` in a child that kills itself at the moment ``HOOK`` says.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import combframe.app.checkpoint as checkpoint
    import combframe.app.train as train
    from combframe.app.cli import main

    hook, at = os.environ["HOOK"], int(os.environ["AT"])
    count = [0]
    if hook == "kill-after-checkpoint":  # kill -9 right after epoch AT's checkpoint
        real = train._save_checkpoint
        def save(run):
            real(run)
            if run.progress.epoch == at and run.progress.step == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        train._save_checkpoint = save
    elif hook == "kill-during-write":  # kill -9 with the new checkpoint not yet renamed
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("checkpoint.pt"):
                count[0] += 1
                if count[0] == at:
                    os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        checkpoint.os.replace = replace
    elif hook == "sigterm-mid-epoch":  # SIGTERM, as a cluster's time limit, after step AT
        real_step = train._step
        def step(*args):
            loss = real_step(*args)
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss
        train._step = step
    sys.exit(main(sys.argv[1:]))
    """
)


def _child(
    tmp_path: Path, hook: str, at: int, name: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOOK": hook,
        "AT": str(at),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
    }
    args = ["train", *TINY, f"output_dir={tmp_path}", f"name={name}", *extra]
    return subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert main(["train", *TINY, f"output_dir={out}", "name=full"]) == 0
    return out / "full"


def _same_run(resumed: Path, full: Path) -> None:
    a, b = _weights(resumed), _weights(full)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"
    keys = ("epoch", "train_rmse", "test_rmse", "lr")
    history = [
        [
            {k: row[k] for k in keys}
            for row in json.loads((f / "metrics.json").read_text())["history"]
        ]
        for f in (resumed, full)
    ]
    assert history[0] == history[1]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(
    tmp_path: Path, uninterrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 used to leave a folder with config.yaml only, and nothing to resume."""
    proc = _child(tmp_path, "kill-after-checkpoint", 2, "k")
    assert proc.returncode == -9, proc.stderr
    folder = tmp_path / "k"
    assert json.loads((folder / "status.json").read_text())["state"] == "running"
    assert checkpoint.load_checkpoint(folder)["progress"]["epoch"] == 2
    assert main(["train", "--resume", str(folder), "--no-progress"]) == 0
    assert "run folder" in capsys.readouterr().out
    _same_run(folder, uninterrupted)
    assert json.loads((folder / "status.json").read_text())["state"] == "completed"


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_resumes_to_the_same_weights(
    tmp_path: Path, uninterrupted: Path
) -> None:
    proc = _child(tmp_path, "sigterm-mid-epoch", 5, "t")  # 3 batches an epoch
    assert proc.returncode == 128 + 15, proc.stderr
    assert "stopped by SIGTERM in epoch 2 after batch 2" in proc.stderr, proc.stderr
    assert "combframe train --resume" in proc.stderr
    folder = tmp_path / "t"
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERM" in status["reason"]
    assert main(["train", "--resume", str(folder), "--no-progress"]) == 0
    _same_run(folder, uninterrupted)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    proc = _child(tmp_path, "kill-during-write", 3, "w")  # checkpoints: start, epoch 1, 2
    assert proc.returncode == -9, proc.stderr
    state = checkpoint.load_checkpoint(tmp_path / "w")
    assert state["progress"]["epoch"] == 1, "the last complete checkpoint is epoch 1's"
    assert any(p.name.startswith(".checkpoint.pt.") for p in (tmp_path / "w").iterdir())
    assert main(["train", "--resume", str(tmp_path / "w"), "--no-progress"]) == 0


def test_resume_refuses_a_completed_run_and_a_folder_without_checkpoint(
    tmp_path: Path, uninterrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", str(uninterrupted)]) == 2
    assert "holds a completed run; nothing to resume" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert main(["train", "--resume", str(uninterrupted), "epochs=9"]) == 2
    assert "give no --config" in capsys.readouterr().err


def test_a_full_disk_at_the_end_prints_the_metrics_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be a bare OSError, without the metrics, and the folder deleted."""
    real = runs.atomic_write

    def full(path: Path, data: bytes) -> None:
        if path.name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(runs, "atomic_write", full)
    assert main(["train", *TINY, f"output_dir={tmp_path}", "name=d"]) == 1
    captured = capsys.readouterr()
    assert "held-out     RMSE" in captured.out
    assert "metrics.json" in captured.err and "No space left on device" in captured.err
    assert (tmp_path / "d" / "model.safetensors").is_file()


def _create(args: tuple[str, int]) -> str:
    output_dir, _ = args
    config = TrainConfig.model_validate({"output_dir": output_dir, "name": "same"})
    return runs.create_run_dir(config).name


def test_processes_creating_run_folders_at_once_get_one_each(tmp_path: Path) -> None:
    """Two processes used to collide with "File exists"."""
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        names = pool.map(_create, [(str(tmp_path), i) for i in range(8)])
    assert sorted(names) == sorted(["same", *(f"same-{i}" for i in range(2, 9))])


def test_compare_marks_each_run_and_points_resume_at_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", *TINY, "--compare", "lr=0.001,1e30", f"output_dir={tmp_path}"]
    assert main([*args, "name=c"]) == 1
    top = tmp_path / "c"
    first, second = (
        json.loads((top / n / "status.json").read_text()) for n in ("1-0.001", "2-1e30")
    )
    assert first["state"] == "completed"
    assert second["state"] == "failed" and "training diverged" in second["reason"]
    assert "resume" not in second, "a diverged run is not resumed; it is retrained"
    assert json.loads((top / "status.json").read_text())["state"] == "failed"
    capsys.readouterr()
    assert main(["train", "--resume", str(top)]) == 2
    err = capsys.readouterr().err
    assert "holds runs that failed (TrainingDivergedError: training diverged" in err
    assert "only an interrupted folder is resumed" in err


def test_a_seeds_run_stopped_by_sigterm_resumes_as_a_whole_and_predicts_as_an_ensemble(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume on the folder used to refuse; its runs had to be resumed one by one."""
    proc = _child(tmp_path, "sigterm-mid-epoch", 20, "sd", "--seeds", "2")
    assert proc.returncode == 128 + 15, proc.stderr
    top = tmp_path / "sd"
    status = json.loads((top / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert status["resume"] == f"combframe train --resume {top}"
    assert f"(run seed=1); continue with `combframe train --resume {top}`" in proc.stderr
    assert not (top / "compare.json").exists()
    assert main(["predict", str(top), "-o", str(tmp_path / "early.csv")]) == 2
    assert f"finish them with `combframe train --resume {top}`" in capsys.readouterr().err
    assert main(["train", "--resume", str(top), "--no-progress"]) == 0
    assert json.loads((top / "status.json").read_text())["state"] == "completed"
    table = json.loads((top / "compare.json").read_text())
    assert [Path(row["run_dir"]).name for row in table] == ["seed-0", "seed-1"]
    assert main(["train", *TINY, "--seeds", "2", f"output_dir={tmp_path}", "name=whole"]) == 0
    whole = json.loads((tmp_path / "whole" / "compare.json").read_text())
    assert [row["test"] for row in table] == [row["test"] for row in whole]
    assert main(["predict", str(top), "-o", str(tmp_path / "p.csv")]) == 0
    assert "(mean and std of 2 models)" in capsys.readouterr().out


def test_a_reused_name_is_said_at_the_start_with_the_folder_the_run_goes_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second `name=twin` went to twin-2 with nothing said until the last line."""
    args = ["train", *TINY, f"output_dir={tmp_path}", "name=twin"]
    assert main(args) == 0
    assert "exists" not in capsys.readouterr().err
    assert main(args) == 0
    out, err = capsys.readouterr()
    first, second = tmp_path / "twin", tmp_path / "twin-2"
    assert err.startswith(
        f"note: {str(first)!r} exists (an earlier run); this run goes to {str(second)!r}"
    )
    assert f"`combframe predict {first}` still predicts with the earlier run's model" in err
    assert out.rstrip().endswith(f"run folder   {second}")
