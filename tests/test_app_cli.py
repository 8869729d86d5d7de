"""The ``combframe`` command's own behaviour: options, usage errors, pipes and start-up cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import combframe
from combframe.app import train as training
from combframe.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["epochs=1", "compounds=12", "poses_per_compound=3", "hidden=4", "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


# ---- --traceback ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--traceback", "list"], ["list", "--traceback"], ["list", "--json", "--traceback"]]
)
def test_traceback_is_accepted_before_and_after_the_command(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode() -> None:
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(combframe, "describe_combinations", explode)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "registry exploded" in err, err


def test_without_traceback_the_error_says_where_to_add_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode() -> None:
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(combframe, "describe_combinations", explode)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("combframe list: error: RuntimeError: registry exploded")
    assert "--traceback" in err


def test_with_traceback_the_error_does_not_say_to_add_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def explode() -> None:
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(combframe, "describe_combinations", explode)
    assert main(["--traceback", "list"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "combframe list: error: RuntimeError: registry exploded"


def test_traceback_after_train_and_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--traceback", "epochs=0"]) == 2  # a usage error, not unexpected
    assert main(["check", "mean", "--traceback", "--seeds", "0", "--poses", "2"]) == 0
    capsys.readouterr()


# ---- check: usage, numeric options ------------------------------------------------------


def test_check_without_a_name_does_not_call_parameters_required(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "NAME" in err and "KEY=VALUE parameters are optional" in err, err
    assert "required" not in err, err
    for name in ("max", "mean", "boltzmann"):
        assert name in err, "the installed combinations are named"


def test_check_help_shows_parameters_as_optional(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: combframe check [options] NAME [KEY=VALUE ...]" in out
    assert "optional combination parameters" in out


@pytest.mark.parametrize(
    ("args", "option", "bound"),
    [
        (["check", "max", "--rtol", "-1"], "--rtol", "> 0"),
        (["check", "max", "--rtol", "0"], "--rtol", "> 0"),
        (["check", "max", "--rtol", "nan"], "--rtol", "finite"),
        (["check", "max", "--rtol", "inf"], "--rtol", "finite"),
        (["check", "max", "--rtol", "tight"], "--rtol", "a number"),
        (["check", "max", "--poses", "0"], "--poses", "at least 1"),
        (["check", "max", "--poses", "3,-2"], "--poses", "at least 1"),
        (["check", "max", "--seeds", "-1"], "--seeds", "at least 0"),
        (["schema", "--indent", "-1"], "--indent", "at least 0"),
    ],
)
def test_bad_numeric_options_are_usage_errors(
    args: list[str], option: str, bound: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"combframe {args[0]}: error: argument {option}: "), err
    assert bound in err, err


# ---- output_dir -----------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if training starts: the run folder must be checked before."""

    def fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the run folder was checked")

    monkeypatch.setattr(training, "_fit", fit)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("compare", [[], ["--compare", "max,mean"]])
def test_an_unusable_output_dir_is_a_usage_error_before_training(
    compare: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    for output_dir, why in ((blocker, "is a file"), (blocker / "runs", "Not a directory")):
        assert main(["train", *TINY, *compare, f"output_dir={output_dir}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("combframe train: error: output_dir: "), err
        assert str(blocker) in err and why in err, err


def test_a_failed_run_keeps_its_folder_marked_failed_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed run used to delete its folder, checkpoint and epochs included."""
    assert main(["train", *TINY, "lr=1e30", f"output_dir={tmp_path}", "name=x"]) == 1
    assert "diverged" in capsys.readouterr().err
    status = json.loads((tmp_path / "x" / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["reason"].startswith("TrainingDivergedError: training diverged"), status
    assert (tmp_path / "x" / "checkpoint.pt").is_file()


def test_the_run_folder_exists_while_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_fit = training._fit

    def fit(run: training._Run, progress: bool, stream: object) -> object:
        seen.append((tmp_path / "early" / "config.yaml").is_file())
        return real_fit(run, progress, None)

    monkeypatch.setattr(training, "_fit", fit)
    assert main(["train", *TINY, f"output_dir={tmp_path}", "name=early"]) == 0
    assert seen == [True]
    assert (tmp_path / "early" / "metrics.json").is_file()


# ---- a closed standard output -------------------------------------------------------------


def _closed_pipe_run(args: list[str], read_first: bool) -> tuple[int, str, str]:
    """Run ``python -m combframe *args``; close its stdout early; return status, line, stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "combframe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(PYTHONUNBUFFERED="1" if read_first else ""),
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline().decode() if read_first else ""
    proc.stdout.close()  # as `| head -1` does
    with proc.stderr:
        err = proc.stderr.read().decode()
    return proc.wait(timeout=300), first, err


@pytest.mark.parametrize("read_first", [True, False], ids=["head-1", "closed-at-once"])
def test_a_closed_stdout_ends_quietly_with_status_141(read_first: bool) -> None:
    status, first, err = _closed_pipe_run(["check", "max", "--seeds", "0,1,2"], read_first)
    if read_first:
        assert first.startswith("check max(")
    assert status == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err == "", err


# ---- start-up cost: no torch for --help and --version -----------------------------------

_STUB = textwrap.dedent(
    """
    import sys, types
    # The package without its __init__ (which loads the library): what combframe.app
    # itself imports is all that is measured here.
    package = types.ModuleType("combframe")
    package.__path__ = [{path!r}]
    sys.modules["combframe"] = package
    from combframe.app.cli import main
    for argv in (["--help"], ["--version"], ["train", "--help"], ["check", "--help"]):
        assert main(argv) == 0, argv
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not loaded, loaded
    print("no torch")
    """
)


def test_help_and_version_do_not_import_torch_in_the_app() -> None:
    script = _STUB.format(path=str(ROOT / "combframe"))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("no torch")
    assert "usage: combframe train" in proc.stdout
    assert "config keys" in proc.stdout


def test_help_in_a_fresh_process_does_not_import_torch() -> None:
    script = (
        "import sys\nfrom combframe.app.cli import main\nassert main(['--help']) == 0\n"
        "assert main(['--version']) == 0\nassert main(['train', '--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.perf_counter() - start < 60
