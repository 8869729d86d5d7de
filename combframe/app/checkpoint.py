"""Files of a run folder that must survive a kill: atomic writes, checkpoints, status.

Every file here is written to a temporary file in the same folder, flushed and
``fsync``-ed, then renamed over its final name (``os.replace``, atomic on POSIX), and
the folder itself is ``fsync``-ed. A process killed at any instant, ``kill -9``
included, leaves either the previous complete file or the new complete one, never a
torn one; a stale temporary file is ignored (and replaced by the next write).

``checkpoint.pt`` holds everything a run needs to continue exactly where it stopped
(:func:`save_checkpoint`); ``status.json`` says whether the run is ``running``,
``interrupted``, ``failed`` (with the reason) or ``completed`` (:func:`write_status`).
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from combframe.errors import CombframeError

__all__ = [
    "CHECKPOINT",
    "STATUS",
    "CheckpointError",
    "StopRequest",
    "atomic_write",
    "load_checkpoint",
    "read_status",
    "save_checkpoint",
    "stop_on_signals",
    "write_status",
]

#: The checkpoint's file name in a run folder.
CHECKPOINT = "checkpoint.pt"
#: The status file's name in a run folder.
STATUS = "status.json"


class CheckpointError(CombframeError, ValueError):
    """A checkpoint or run folder that cannot be resumed; the message says why."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync folder.

    Raises
    ------
    OSError
        If the folder cannot be written (full disk, permissions); ``path`` is then
        unchanged and the temporary file removed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened (Windows)
        return
    try:
        os.fsync(folder)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(folder)


def save_checkpoint(folder: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``folder/checkpoint.pt``."""
    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write(folder / CHECKPOINT, buffer.getvalue())


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """Read ``folder/checkpoint.pt`` (with ``weights_only=True``: tensors and plain data).

    Raises
    ------
    CheckpointError
        If there is no checkpoint or it cannot be read.
    """
    import torch

    path = folder / CHECKPOINT
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a run folder (no such folder)")
    runs = sorted(p.parent for p in folder.glob(f"*/{CHECKPOINT}"))
    if not path.is_file() and runs:
        left = [r for r in runs if read_status(r).get("state") != "completed"] or runs
        raise CheckpointError(
            f"{str(folder)!r} holds the runs of --compare or --seeds "
            f"({', '.join(r.name for r in runs)}); resume one of them: "
            f"combframe train --resume {str(left[0])!r}"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} holds no {CHECKPOINT}: the run stopped before its first "
            f"epoch ended; start it again with --config {str(folder / 'config.yaml')!r}"
        )
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file; say which and why
        raise CheckpointError(f"cannot read {str(path)!r}: {type(exc).__name__}: {exc}") from None
    return state


def write_status(folder: Path, state: str, **info: Any) -> None:
    """Record the run's ``state`` (and details such as the failure's ``reason``)."""
    text = json.dumps({"state": state, **info}, indent=2) + "\n"
    atomic_write(folder / STATUS, text.encode())


def read_status(folder: Path) -> dict[str, Any]:
    """Return the content of ``folder/status.json`` (``{"state": "unknown"}`` without one)."""
    try:
        data = json.loads((folder / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"state": "unknown"}
    return data if isinstance(data, dict) else {"state": "unknown"}


class StopRequest:
    """Set by SIGTERM or SIGINT while :func:`stop_on_signals` is active.

    Attributes
    ----------
    signum
        The first signal received, or 0.
    """

    def __init__(self) -> None:
        self.signum = 0


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGTERM and SIGINT into a request to stop at the next step boundary.

    The training loop polls the request, writes its checkpoint and stops; a second
    signal raises :class:`KeyboardInterrupt` at once. Outside the main thread (where
    Python cannot install handlers) nothing is installed.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: object) -> None:
        if stop.signum:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
