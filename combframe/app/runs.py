"""Run folders of ``combframe train``: claimed before training, filled after it.

The folder is created (and ``config.yaml`` written) before the first training step, so a
path that cannot be written is a usage error, not a run thrown away at its end. A run
that fails removes the folder it created. Under ``torchrun`` only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from combframe.app.config import ConfigError, TrainConfig
from combframe.app.distributed import Ranks

__all__ = ["RunResult", "claimed_run_dir", "create_run_dir", "new_run_dir", "write_run"]


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


def new_run_dir(config: TrainConfig, suffix: str = "") -> Path:
    """Return a fresh folder under ``config.output_dir``: ``config.name`` or a timestamp."""
    base = config.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(config.output_dir)
    candidate = root / (base + suffix)
    n = 2
    while candidate.exists():
        candidate = root / f"{base}-{n}{suffix}"
        n += 1
    return candidate


def _dump_config(folder: Path, resolved: Mapping[str, Any]) -> None:
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump(dict(resolved), sort_keys=False))


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
    folder = new_run_dir(config)
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
    except OSError as exc:
        where = exc.filename if exc.filename is not None else folder
        raise ConfigError(
            f"output_dir: cannot create the run folder {str(folder)!r}: "
            f"{exc.strerror or exc} ({where})"
        ) from None
    try:
        _dump_config(folder, config.model_dump(mode="json"))
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(
            f"output_dir: cannot write to the run folder {str(folder)!r}: {exc.strerror or exc}"
        ) from None
    return folder


@contextmanager
def claimed_run_dir(config: TrainConfig, ranks: Ranks) -> Iterator[Path | None]:
    """Create the run folder on rank 0 (None on the others); remove it if the run fails.

    Raises
    ------
    ConfigError
        On every rank, when rank 0 cannot create the folder.
    """
    folder: Path | None = None
    error: str | None = None
    if ranks.main:
        try:
            folder = create_run_dir(config)
        except ConfigError as exc:
            error = str(exc)
    error = ranks.broadcast(error)
    if error is not None:
        raise ConfigError(error)
    try:
        yield folder
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def write_run(folder: Path, resolved: Mapping[str, Any], result: RunResult) -> None:
    """Write ``config.yaml``, ``metrics.json`` and (if possible) ``loss.png`` to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _dump_config(folder, resolved)
    if resolved.get("plot", True):
        note = _plot_history(folder / "loss.png", result)
        if note is not None:
            result.notes.append(note)
    result.metrics["files"] = [*sorted(p.name for p in folder.iterdir()), "metrics.json"]
    (folder / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    result.run_dir = folder


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
