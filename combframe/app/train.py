"""``combframe train`` and ``--resume``: one run, from its configuration to its folder.

:func:`train` fits a small single-pose network wrapped in :class:`combframe.MultiPoseModel`
to compound-level values and reports held-out metrics; :func:`resume` continues a run
from its checkpoint. Both go through :func:`run_training`: the data
(:mod:`combframe.app.loading`), the model and optimizer (:mod:`combframe.app.building`),
then the training loop below (:func:`_fit`: epochs of :func:`_step`, one
``model(compounds=...)`` call and one backward per batch of compounds, a checkpoint after
each epoch and on SIGTERM or SIGINT), the verdict (:mod:`combframe.app.evaluation`) and
the run folder (:mod:`combframe.app.runs`). :mod:`combframe.app.compare` trains one run
per value of a key. Under ``torchrun`` each batch is shared out over the processes
(:mod:`combframe.app.distributed`).
"""

from __future__ import annotations

import copy
import functools
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TextIO

import torch

import combframe
from combframe.app.building import Progress, Run, build_run, check_config
from combframe.app.checkpoint import (
    CheckpointError,
    StopRequest,
    load_checkpoint,
    read_status,
    save_checkpoint,
    stop_on_signals,
    write_status,
)
from combframe.app.config import TrainConfig, saved_config
from combframe.app.data import Compound, Dataset
from combframe.app.distributed import Ranks
from combframe.app.evaluation import (
    TrainingDivergedError,
    diverged,
    predict_compounds,
    run_metrics,
    save_models,
)
from combframe.app.loading import load_data
from combframe.app.memory import CUDA_RUN_KIND, cpu_kind, measure_step, profiled, run_peak
from combframe.app.metrics import rmse, squared_errors
from combframe.app.priors import log_priors
from combframe.app.progress import epoch_line, is_terminal, progress_bar
from combframe.app.runs import (
    RunInterruptedError,
    RunResult,
    RunWriteError,
    claimed_run_dir,
    write_epoch_logs,
    write_run,
)

__all__ = [
    "RunResult",
    "TrainingDivergedError",
    "load_data",
    "resume",
    "run_training",
    "train",
]


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    write: bool = True,
    run_dir: Path | None = None,
    stream: TextIO | None = None,
    data: Dataset | None = None,
    ranks: Ranks | None = None,
) -> RunResult:
    """Train on the configured compounds and report held-out metrics.

    Parameters
    ----------
    config
        The validated configuration.
    progress
        Show progress on ``stream`` (rank 0 only): a tqdm bar on a terminal, one line
        per epoch elsewhere.
    write
        Write the run folder (``config.yaml``, checkpoint, model, ``metrics.json``, ...).
    run_dir
        Folder to write to; default: a new folder under ``config.output_dir``, created
        before training (and marked failed, not removed, if the run fails).
    stream
        Where progress goes; default ``sys.stderr``.
    data
        The compounds, if already loaded with :func:`load_data`.
    ranks
        This process's rank, under ``torchrun`` (in a joined process group).

    Returns
    -------
    RunResult
        Resolved combination, metrics, notes and the run folder.

    Raises
    ------
    ConfigError
        If the device, the strategy, the data or the run folder cannot be used.
    TrainingDivergedError
        If the loss stops being finite or the final RMSE is far above the values'
        spread.
    RunInterruptedError
        On SIGTERM or SIGINT, after writing the checkpoint.
    """
    ranks = ranks or Ranks()
    check_config(config, ranks)
    data = data if data is not None else load_data(config)
    if not write or run_dir is not None:
        return run_training(config, data, ranks, run_dir if write else None, progress, stream)
    with claimed_run_dir(config, ranks) as folder:
        return run_training(config, data, ranks, folder, progress, stream)


def resume(
    folder: Path, *, progress: bool = True, stream: TextIO | None = None, ranks: Ranks | None = None
) -> RunResult:
    """Continue the run in ``folder`` from its checkpoint, in the same folder.

    Every rank reads the checkpoint; rank 0 writes. On the CPU in float64 the resumed
    run ends with the same weights as one never stopped.

    Raises
    ------
    CheckpointError
        If the folder holds no usable checkpoint or its run has already completed.
    """
    ranks = ranks or Ranks()
    state = _resumable(folder)
    config = TrainConfig.model_validate(state["config"])
    check_config(config, ranks)
    data = load_data(config)
    with claimed_run_dir(config, ranks, existing=folder) as claimed:
        if claimed is not None:
            write_status(claimed, "running")
        return run_training(config, data, ranks, claimed or folder, progress, stream, state)


def run_training(
    config: TrainConfig,
    data: Dataset,
    ranks: Ranks,
    folder: Path | None,
    progress: bool,
    stream: TextIO | None,
    resume: dict[str, Any] | None = None,
) -> RunResult:
    """Train one run on ``data`` into ``folder`` (rank 0; None: write nothing).

    ``resume``: the checkpoint to continue from. The one path of every run: :func:`train`,
    :func:`resume` and :func:`combframe.app.compare.compare` call it.
    """
    device = check_config(config, ranks)
    with _torch_threads(config.threads):
        run = build_run(config, data, device, ranks)
        run.folder = folder if ranks.main else None
        if resume is not None:
            _restore(run, resume)
        _fit(run, progress, stream)
        result = run_metrics(run)
        if run.folder is not None:
            try:
                save_models(run, run.folder)
            except OSError as exc:
                raise RunWriteError(f"cannot write the model: {exc}", result) from None
    if folder is not None and ranks.main:
        write_run(folder, saved_config(config), result)
    return result


def _resumable(folder: Path) -> dict[str, Any]:
    status = read_status(folder)
    if status.get("state") == "completed":
        raise CheckpointError(
            f"{str(folder)!r} holds a completed run; nothing to resume (train longer "
            f"with --config {str(folder / 'config.yaml')!r} epochs=N into a new folder)"
        )
    return load_checkpoint(folder)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(run: Run, progress: bool, stream: TextIO | None) -> None:
    """Train the remaining epochs, checkpointing each (and on SIGTERM or SIGINT)."""
    steps = math.ceil(len(run.data.train) / run.config.batch_size)
    bar = progress_bar(
        run.config.epochs * steps,
        f"train {run.config.combination.name}",
        stream if stream is not None else sys.stderr,
        progress and run.ranks.main,
    )
    p = run.progress
    if p.epoch == 0 and p.step == 0:
        p.initial_rmse = rmse(*predict_compounds(run, run.data.train))  # for the divergence message
        _save_checkpoint(run)  # a run killed in its first epoch resumes from the start
    bar.update(p.epoch * steps + p.step)
    lines = not is_terminal(stream) and run.ranks.main and progress
    with bar, stop_on_signals() as stop, _cuda_peak(run):
        while p.epoch < run.config.epochs and not p.stopped_early:
            _epoch(run, bar, stop)
            p = run.progress
            bar.set_postfix(train_rmse=f"{p.history[-1]['train_rmse']:.3f}")
            if lines:
                epoch_line(run, stream)
            signum = _stop_now(run, stop)
            if signum and p.epoch < run.config.epochs and not p.stopped_early:
                raise _interrupted(run, signum)


def _epoch(run: Run, bar: Any, stop: StopRequest) -> None:
    """Train the rest of the epoch in progress, from batch ``run.progress.step`` on.

    On a stop request between two batches, write the checkpoint and raise
    :class:`RunInterruptedError`.
    """
    p = run.progress
    epoch, start = p.epoch + 1, time.perf_counter()
    shuffle = torch.Generator()
    shuffle.set_state(p.shuffle)
    n_train, size = len(run.data.train), run.config.batch_size
    order = torch.randperm(n_train, generator=shuffle).tolist()
    n_steps = math.ceil(n_train / size)
    for k in range(p.step, n_steps):
        batch = [run.data.train[i] for i in order[k * size : (k + 1) * size]]
        if _profile_now(run, p.epoch * n_steps + k + 1):
            step = functools.partial(_step, run, batch, epoch)
            loss, peak = measure_step(step)
            p.peak_bytes, p.peak_kind = max(p.peak_bytes, peak), cpu_kind(run.config.memory_steps)
        else:
            loss = _step(run, batch, epoch)
        p.partial, p.step = p.partial + loss, k + 1
        bar.update(1)
        signum = _stop_now(run, stop) if k + 1 < n_steps else 0
        if signum:
            p.partial = run.ranks.sum(p.partial)  # rank 0 resumes with every rank's share
            _save_checkpoint(run)
            raise _interrupted(run, signum)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    p.seconds.append(time.perf_counter() - start)
    total = run.ranks.sum(p.partial)
    p.epoch, p.step, p.partial, p.shuffle = epoch, 0, 0.0, shuffle.get_state()
    _end_epoch(run, math.sqrt(total / _value_count(run, run.data.train)))


def _value_count(run: Run, compounds: Sequence[Compound]) -> int:
    """How many values ``compounds`` hold: one each, or those present of several targets."""
    if not run.data.targets:
        return len(compounds)
    return int(torch.stack([c.target for c in compounds]).isfinite().sum())


def _step(run: Run, batch: Sequence[Compound], epoch: int) -> float:
    r"""One optimizer step on ``batch``; return this rank's sum of squared errors.

    The loss is the mean squared error over the values of the whole batch,

    .. math:: L = \frac{1}{|P|} \sum_{(c, j) \in P} w_j (G_{cj} - y_{cj})^2,

    :math:`P` the (compound, target) pairs with a value (every compound, one target,
    :math:`w = 1`, when there is one value per compound) and :math:`w_j` the
    ``loss.weights``: each rank weighs its share by ``world / |P|`` and
    DistributedDataParallel averages over the ranks. A rank left without compounds (a
    batch smaller than the number of ranks) takes part in the backward with weight 0.
    """
    local = run.ranks.shard(batch)
    weight = run.ranks.world / _value_count(run, batch)
    if not local:
        local, weight = list(batch[:1]), 0.0
    run.optimizer.zero_grad(set_to_none=True)
    try:
        poses, prior = [list(c.poses) for c in local], log_priors(local)
        combined, _, _ = run.trainer(compounds=poses, prior=prior)
    except combframe.CombinationError as exc:  # non-finite per-pose predictions
        raise diverged(run, epoch, str(exc).split(";")[0]) from None
    squared = squared_errors(combined, torch.stack([c.target for c in local]))
    weights = run.config.loss.weights
    weighted = squared * squared.new_tensor(weights) if weights is not None else squared
    (weighted.sum() * weight).backward()
    total = float(squared.detach().sum()) if weight else 0.0
    if not math.isfinite(total):
        raise diverged(run, epoch, f"the loss is {total}")
    run.optimizer.step()
    run.schedule.step()
    return total


def _stop_now(run: Run, stop: StopRequest) -> int:
    """Return the signal that asks every rank to stop (0: go on); ranks agree on it."""
    return int(run.ranks.max(float(stop.signum))) if run.ranks.active else stop.signum


def _interrupted(run: Run, signum: int) -> RunInterruptedError:
    p = run.progress
    where = f"in epoch {p.epoch + 1} after batch {p.step}" if p.step else f"after epoch {p.epoch}"
    folder = run.folder
    resume = f"; continue with `combframe train --resume {folder}`" if folder else ""
    return RunInterruptedError(
        f"stopped by {signal.Signals(signum).name} {where}; checkpoint written{resume}",
        signum,
        folder,
    )


def _end_epoch(run: Run, train_rmse: float) -> None:
    """Evaluate after an epoch, keep the best model, decide on early stopping, save."""
    p = run.progress
    row = {"epoch": p.epoch, "train_rmse": train_rmse}
    if run.val:
        row["val_rmse"] = rmse(*predict_compounds(run, run.val))
        if row["val_rmse"] < p.best_rmse:
            p.best_epoch, p.best_rmse, p.stale = p.epoch, row["val_rmse"], 0
            p.best_model = copy.deepcopy(run.model.state_dict())
        else:
            p.stale += 1
        patience = run.config.patience
        p.stopped_early = patience is not None and p.stale >= patience
    row["test_rmse"] = rmse(*predict_compounds(run, run.data.test))
    row["lr"] = float(run.optimizer.param_groups[0]["lr"])
    row["seconds"] = p.seconds[-1]
    p.history.append(row)
    if run.folder is not None and run.ranks.main:
        _save_checkpoint(run)
        write_epoch_logs(run.folder, p.history, run.config.tensorboard)


@contextmanager
def _cuda_peak(run: Run) -> Iterator[None]:
    """Keep the CUDA allocator's peak over the run (when asked for and on CUDA)."""
    if not run.config.memory or run.device.type != "cuda":
        yield
        return
    p = run.progress
    with run_peak(run.device) as peak:
        try:
            yield
        finally:
            p.peak_bytes, p.peak_kind = max(p.peak_bytes, *peak), CUDA_RUN_KIND


def _profile_now(run: Run, number: int) -> bool:
    """Whether the run's training step ``number`` (from 1) runs under the CPU profiler."""
    config = run.config
    return config.memory and run.device.type == "cpu" and profiled(number, config.memory_steps)


def _save_checkpoint(run: Run) -> None:
    """Write the run's checkpoint (rank 0, with a run folder): everything to resume."""
    if run.folder is None or not run.ranks.main:
        return
    p = run.progress
    state = {
        "format": 1,
        "config": saved_config(run.config),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "progress": {f.name: getattr(p, f.name) for f in fields(p)},
    }
    save_checkpoint(run.folder, state)


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Continue ``run`` from a checkpoint written by :func:`_save_checkpoint`."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    run.progress = Progress(**state["progress"])
    if not run.ranks.main:
        run.progress.partial = 0.0  # rank 0 carries the sum of every rank's share
