"""Run folders of ``combframe train``: claimed before training, filled after it.

The folder is created (and ``config.yaml`` written) before the first training step, so a
path that cannot be written is a usage error, not a run thrown away at its end. A run
that fails keeps its folder (its checkpoint and the epochs already done), marked
``failed`` or ``interrupted`` with the reason in ``status.json``. Under ``torchrun``
only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import shutil
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from combframe.app.checkpoint import atomic_write, write_status
from combframe.app.config import ConfigError, TrainConfig, saved_config
from combframe.app.distributed import Ranks
from combframe.errors import CombframeError

__all__ = [
    "RunInterruptedError",
    "RunResult",
    "RunWriteError",
    "claimed_run_dir",
    "create_run_dir",
    "name_taken_note",
    "tensorboard_note",
    "write_epoch_logs",
    "write_run",
]


class RunInterruptedError(CombframeError):
    """A run stopped by SIGTERM or SIGINT after writing its checkpoint.

    Attributes
    ----------
    signum
        The signal's number (the command exits with ``128 + signum``).
    folder
        The run folder holding the checkpoint, or None on ranks other than 0.
    """

    def __init__(self, message: str, signum: int, folder: Path | None) -> None:
        super().__init__(message)
        self.signum = signum
        self.folder = folder


@dataclass
class RunResult:
    """What one training run produced.

    Attributes
    ----------
    combination
        The combination's resolved ``{name, <params>}``.
    metrics
        The content of ``metrics.json``.
    run_dir
        The run folder, or None when nothing was written.
    notes
        Things the user should know (an undefined metric, a plot that was not drawn).
    label
        In ``--compare``, the setting that tells this run apart (``strategy=stream``).
    """

    combination: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    label: str = ""


class RunWriteError(CombframeError, OSError):
    """The run trained, but a file of its folder could not be written (a full disk).

    ``result`` holds the metrics, so that they can still be printed.
    """

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def _make_run_dir(config: TrainConfig) -> Path:
    """Create a fresh folder under ``config.output_dir``: ``config.name`` or a timestamp.

    ``-2``, ``-3``, ... is appended while the name is taken; the check is the creation
    itself, so two processes starting at once get two folders.
    """
    candidates = _candidates(config)
    while True:
        candidate = next(candidates)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _candidates(config: TrainConfig) -> Iterator[Path]:
    """Yield the run folder's possible paths: ``NAME``, then ``NAME-2``, ``NAME-3``, ..."""
    base = config.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(config.output_dir)
    yield root / base
    for n in itertools.count(2):
        yield root / f"{base}-{n}"


def name_taken_note(config: TrainConfig) -> str | None:
    """Say, before a run starts, that ``output_dir/name`` is taken and where the run goes.

    None when ``name`` is unset or free. The folder is claimed only when the run starts,
    so the one named here is where it goes unless another run takes it first.
    """
    if not config.name:
        return None
    taken = Path(config.output_dir) / config.name
    if not taken.exists():
        return None
    free = next(c for c in _candidates(config) if not c.exists())
    return (
        f"{str(taken)!r} exists (an earlier run); this run goes to {str(free)!r}, and "
        f"`combframe predict {taken}` still predicts with the earlier run's model"
    )


def _dump_config(folder: Path, resolved: Mapping[str, Any]) -> None:
    import yaml

    atomic_write(folder / "config.yaml", yaml.safe_dump(dict(resolved), sort_keys=False).encode())


def create_run_dir(config: TrainConfig) -> Path:
    """Create a new run folder and write ``config.yaml`` into it.

    Raises
    ------
    ConfigError
        One line naming ``output_dir``, the path and why it cannot be written.
    """
    root = Path(config.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir: {str(root)!r} is a file, not a folder")
    folder = root / (config.name or "")
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = _make_run_dir(config)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else folder
        raise ConfigError(
            f"output_dir: cannot create the run folder {str(folder)!r}: "
            f"{exc.strerror or exc} ({where})"
        ) from None
    try:
        _dump_config(folder, saved_config(config))
        write_status(folder, "running")
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(
            f"output_dir: cannot write to the run folder {str(folder)!r}: {exc.strerror or exc}"
        ) from None
    return folder


@contextmanager
def claimed_run_dir(
    config: TrainConfig, ranks: Ranks, existing: Path | None = None
) -> Iterator[Path | None]:
    """Create the run folder on rank 0 (None on the others); mark it if the run fails.

    ``existing`` (a resumed run) is used instead of a new folder. A run that raises keeps
    its folder, with ``status.json`` saying ``interrupted`` (and how to resume) or
    ``failed`` with the reason.

    Raises
    ------
    ConfigError
        On every rank, when rank 0 cannot create the folder.
    """
    folder: Path | None = None
    error: str | None = None
    if ranks.main:
        try:
            folder = existing if existing is not None else create_run_dir(config)
        except ConfigError as exc:
            error = str(exc)
    error = ranks.broadcast(error)
    if error is not None:
        raise ConfigError(error)
    try:
        yield folder
    except BaseException as exc:
        if folder is not None:
            _mark_stopped(folder, exc)
        raise


def _mark_stopped(folder: Path, exc: BaseException) -> None:
    """Record in ``status.json`` why the run in ``folder`` stopped; never raise."""
    if isinstance(exc, RunInterruptedError):
        state, reason = "interrupted", f"stopped by {signal.Signals(exc.signum).name}"
    elif isinstance(exc, KeyboardInterrupt):
        state, reason = "interrupted", "stopped by SIGINT (Ctrl-C)"
    else:
        state, reason = "failed", f"{type(exc).__name__}: {exc}"
    how = {"resume": f"combframe train --resume {folder}"} if state == "interrupted" else {}
    with contextlib.suppress(OSError):  # the disk that failed the run may refuse this too
        write_status(folder, state, reason=reason, **how)


def write_run(folder: Path, resolved: Mapping[str, Any], result: RunResult) -> None:
    """Write ``config.yaml``, ``metrics.json`` and (if possible) ``loss.png`` to ``folder``.

    Raises
    ------
    RunWriteError
        Naming the file that could not be written (a full disk); the metrics are in
        its ``result`` and the files already written (the checkpoint, the model) stay.
    """
    try:
        _write_files(folder, resolved, result)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else folder
        raise RunWriteError(
            f"the run finished but {str(where)!r} could not be written: "
            f"{exc.strerror or exc}; the metrics are printed above, and the files "
            f"already in {str(folder)!r} are kept",
            result,
        ) from None
    result.run_dir = folder


def _write_files(folder: Path, resolved: Mapping[str, Any], result: RunResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _dump_config(folder, resolved)
    if resolved.get("plot", True):
        note = _plot_history(folder / "loss.png", result)
        if note is not None:
            result.notes.append(note)
    result.metrics["files"] = sorted({*(p.name for p in folder.iterdir()), "metrics.json"})
    result.metrics["files"] = [f for f in result.metrics["files"] if not f.startswith(".")]
    text = json.dumps(result.metrics, indent=2) + "\n"
    atomic_write(folder / "metrics.json", text.encode())
    write_status(folder, "completed")


def write_epoch_logs(
    folder: Path, history: Sequence[Mapping[str, float]], tensorboard: bool
) -> None:
    """Rewrite ``metrics.csv`` (one row per epoch) and log the last epoch to TensorBoard.

    The TensorBoard log (``folder/tensorboard``) is written only when asked for and
    ``tensorboard`` is installed (:func:`tensorboard_note` says when it is not).
    """
    columns = list(dict.fromkeys(k for row in history for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(folder / "metrics.csv", out.getvalue().encode())
    if tensorboard and tensorboard_note() is None:
        from torch.utils.tensorboard import SummaryWriter

        row = history[-1]
        with SummaryWriter(str(folder / "tensorboard"), purge_step=int(row["epoch"])) as log:
            for key, value in row.items():
                if key != "epoch":
                    log.add_scalar(key, value, int(row["epoch"]))


def tensorboard_note() -> str | None:
    """Say why no TensorBoard log can be written, or return None when it can."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return (
            "no TensorBoard log: tensorboard is not installed "
            "(pip install 'combframe[tensorboard]')"
        )
    return None


def _plot_history(path: Path, result: RunResult) -> str | None:
    """Draw the loss curves; return a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            f"{path.name} not written: matplotlib is not installed (pip install 'combframe[plot]')"
        )
    history = result.metrics["history"]
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(
        epochs, [h["train_rmse"] for h in history], marker="o", label="train (during the epoch)"
    )
    ax.plot(epochs, [h["test_rmse"] for h in history], marker="s", label="held-out")
    ax.set_xlabel("epoch")
    ax.set_ylabel("RMSE of compound value")
    ax.set_title(f"combination: {result.combination['name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
