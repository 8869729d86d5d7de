"""Training for ``combframe train``: data, model, loop, metrics and the run folder.

:func:`train` fits a small single-pose network wrapped in :class:`combframe.MultiPoseModel`
to compound-level values (the built-in synthetic set of :mod:`combframe.app.data` or a
user's compounds file) and reports held-out metrics; :func:`compare` does so once per
combination. Each optimizer step runs one batch of compounds through one
``model(compounds=...)`` call and one backward. Under ``torchrun`` the batch is shared
out over the processes (:mod:`combframe.app.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from pydantic import ValidationError
from torch import Tensor

import combframe
from combframe.app.checkpoint import (
    CheckpointError,
    StopRequest,
    load_checkpoint,
    read_status,
    save_checkpoint,
    stop_on_signals,
    write_status,
)
from combframe.app.config import (
    SYNTHETIC_KEYS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_validation_error,
)
from combframe.app.data import Compound, DataError, load_compounds, make_dataset, split_compounds
from combframe.app.distributed import Ranks
from combframe.app.memory import CUDA_RUN_KIND, measure_step, process_peak_rss_mb, run_peak
from combframe.app.metrics import (
    DIVERGENCE_FACTOR,
    baseline_note,
    divergence,
    held_out_metrics,
    rmse,
)
from combframe.app.models import DataInfo, build_network
from combframe.app.readers import BUILT_IN, is_molecular, read_molecules, skipped_note
from combframe.app.runs import (
    RunInterruptedError,
    RunResult,
    RunWriteError,
    claimed_run_dir,
    tensorboard_note,
    write_epoch_logs,
    write_run,
)
from combframe.app.saved import save_model

__all__ = [
    "Dataset",
    "RunResult",
    "TrainingDivergedError",
    "build_model",
    "check_config",
    "compare",
    "load_data",
    "parse_compare",
    "resume",
    "train",
]

#: Compounds per evaluation call.
_EVAL_BATCH = 64


class TrainingDivergedError(RuntimeError):
    """Training diverged: a non-finite loss or a final RMSE far above the values' spread.

    ``same_on_every_rank`` is True when every process reached the verdict together (from
    metrics reduced over the ranks), False when one process found a non-finite loss.
    """

    def __init__(self, message: str, *, same_on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


@dataclass(frozen=True)
class Dataset:
    """The compounds of a run, split, and where they come from.

    Attributes
    ----------
    train, test
        The two splits; ``test`` is never trained on.
    features
        Features of a pose (0 for molecules).
    source
        ``"built-in"``, the path of the compounds file or ``"built-in <name>"``.
    kind
        ``"vectors"`` (poses are feature rows) or ``"molecules"`` (PyG ``Data``).
    skipped
        What ``reader.skip_invalid`` left out, one line each.
    """

    train: tuple[Compound, ...]
    test: tuple[Compound, ...]
    features: int
    source: str
    kind: str = "vectors"
    skipped: tuple[str, ...] = ()


def _dtype(config: TrainConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


def load_data(config: TrainConfig, *, for_prediction: bool = False) -> Dataset:
    """Load the compounds of a run, split: the one entry point for every input format.

    The built-in synthetic set (``data`` unset), a JSON file of feature vectors, or
    molecules (a built-in real set by name, an SDF, SMILES, a manifest; see
    :mod:`combframe.app.readers` and ``docs/data.md``).

    The one reader of a run's data: ``combframe predict`` calls it too, with
    ``for_prediction=True``, to get every compound in ``train`` (the file's order), none
    held out, and compounds without a value allowed (their target is NaN).

    Raises
    ------
    ConfigError
        ``data: <file>: <record> (<compound>): <problem>`` for input that cannot be used.
    """
    if is_molecular(config.data):
        return _molecules(config, for_prediction)
    if config.data is not None and not config.data.suffix and not config.data.exists():
        raise ConfigError(
            f"data: {str(config.data)!r} is neither a file nor a built-in set "
            f"({', '.join(BUILT_IN)})"
        )
    if config.data is None:
        built_in = make_dataset(
            n_compounds=config.compounds,
            poses_per_compound=config.poses_per_compound,
            features=config.features,
            pose_spread=config.pose_spread,
            noise=config.noise,
            test_fraction=config.test_fraction,
            seed=config.seed,
            dtype=_dtype(config),
        )
        if for_prediction:
            every = (*built_in.train, *built_in.test)
            return Dataset(every, (), built_in.features, "built-in")
        return Dataset(built_in.train, built_in.test, built_in.features, "built-in")
    try:
        compounds = load_compounds(config.data, dtype=_dtype(config), values=not for_prediction)
    except DataError as exc:
        raise ConfigError(f"data: {exc}") from None
    first = compounds[0].poses
    features = int(first.shape[-1]) if isinstance(first, Tensor) else 0
    if for_prediction:
        return Dataset(tuple(compounds), (), features, str(config.data))
    train_set, test_set = split_compounds(compounds, config.test_fraction, config.seed)
    return Dataset(train_set, test_set, features, str(config.data))


def _molecules(config: TrainConfig, for_prediction: bool) -> Dataset:
    try:
        read = read_molecules(
            str(config.data), config.reader, _dtype(config), values=not for_prediction
        )
    except DataError as exc:
        raise ConfigError(f"data: {exc}") from None
    if for_prediction:
        return Dataset(tuple(read.compounds), (), 0, read.source, "molecules", read.skipped)
    train_set, test_set = split_compounds(read.compounds, config.test_fraction, config.seed)
    return Dataset(train_set, test_set, 0, read.source, "molecules", read.skipped)


def _checked_combination(config: TrainConfig) -> combframe.Combination:
    """Build the combination, refusing a strategy it does not support."""
    combination = config.combination.build()
    if config.strategy == "stream" and not isinstance(combination, combframe.StreamingCombination):
        raise ConfigError(
            f"strategy: 'stream' needs a streaming combination and {combination.name!r} "
            "does not implement stream_terms; use strategy=store or strategy=recompute"
        )
    return combination


def _resolve_device(spec: str, ranks: Ranks) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device: {spec!r} asked for, but CUDA is not available in this torch "
            "build or machine; use device=cpu or device=auto"
        )
    if ranks.active and device.index is not None:
        raise ConfigError(
            f"device: {spec!r} names one GPU for {ranks.world} processes; use device=cuda "
            "(each process takes cuda:LOCAL_RANK)"
        )
    if ranks.active:
        device = torch.device("cuda", ranks.local_rank)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device: {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA "
            "device(s) exist"
        )
    return device


def check_config(config: TrainConfig, ranks: Ranks | None = None) -> torch.device:
    """Check what pydantic cannot (combination and strategy, device); return the device.

    Raises
    ------
    ConfigError
        If the device is unavailable or the strategy does not fit the combination.
    """
    _checked_combination(config)
    _strategy(config)
    return _resolve_device(config.device, ranks or Ranks())


# ---- one run ------------------------------------------------------------------------


@dataclass
class _Progress:
    """Where a run stands: everything a checkpoint holds besides the torch states.

    ``shuffle`` is the shuffling generator's state at the start of the epoch in progress
    (``step`` batches of it done, their squared errors summed in ``partial``), or at the
    start of the next epoch when ``step`` is 0.
    """

    shuffle: Tensor
    epoch: int = 0
    step: int = 0
    partial: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_rmse: float = math.inf
    best_model: dict[str, Any] | None = None
    stale: int = 0
    stopped_early: bool = False
    initial_rmse: float = 0.0
    peak_bytes: int = 0
    peak_kind: str = ""


@dataclass
class _Run:
    """A run being trained: its settings, data, model, optimizer and progress."""

    config: TrainConfig
    data: Dataset
    device: torch.device
    ranks: Ranks
    model: combframe.MultiPoseModel
    trainer: torch.nn.Module  # the model, or the model wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    progress: _Progress
    val: tuple[Compound, ...] = ()
    folder: Path | None = None


def chunk_size(config: TrainConfig, kind: str) -> int:
    """Poses per network call: ``config.chunk_size``, else 16 for molecules, otherwise 1.

    ``strategy=store`` takes molecules one per call: its per-pose gradients of a chunk
    come from ``torch.func.vmap``, which cannot map over a PyG ``Batch``.
    """
    if config.chunk_size is not None:
        return config.chunk_size
    return 16 if kind == "molecules" and config.strategy != "store" else 1


def _moved(compounds: Sequence[Compound], device: torch.device) -> tuple[Compound, ...]:
    return tuple(c.to(device) for c in compounds)


class _Standardized(torch.nn.Module):
    """A network trained on standardised values: its output times ``scale`` plus ``shift``."""

    def __init__(self, net: torch.nn.Module, shift: float, scale: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("shift", torch.tensor(shift))
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: Any) -> Tensor:
        out: Tensor = self.net(x) * self.scale + self.shift
        return out


def build_model(
    config: TrainConfig,
    features: int,
    output_bias: float = 0.0,
    device: torch.device | str = "cpu",
    output_scale: float = 1.0,
    kind: str = "vectors",
) -> combframe.MultiPoseModel:
    """Build the configured model, seeded: the one place a run's model is made.

    The network comes from :func:`combframe.app.models.build_network` (``model.name``:
    the MLP for feature vectors, SchNet for molecules, or an import path), for data of
    ``kind`` with ``features`` per pose, starting at ``output_bias``. Training calls it
    with the data's ``features`` and ``kind`` and the starting value of
    :func:`_start` (and, with ``normalize_targets``, the training values' standard
    deviation ``output_scale``); :func:`combframe.app.load` calls it with the
    ``network`` entry saved next to the weights (``{"features": F, "kind": ...}``) and
    then loads the weights (the offsets and scale too).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net: torch.nn.Module
        if config.normalize_targets:
            inner = build_network(config, DataInfo(kind, features, 0.0))
            net = _Standardized(inner, output_bias, output_scale)
        else:
            net = build_network(config, DataInfo(kind, features, output_bias))
    net = net.to(device=device, dtype=_dtype(config))
    return combframe.MultiPoseModel(
        net,
        _checked_combination(config),
        strategy=_strategy(config),
        chunk_size=chunk_size(config, kind),
    )


def _strategy(config: TrainConfig) -> Any:
    """Return the configured strategy, built with ``strategy_options``."""
    cls = {"store": combframe.Store, "recompute": combframe.Recompute, "stream": combframe.Stream}
    chosen = cls[config.strategy]
    try:
        return chosen(**config.strategy_options)
    except TypeError:
        known = [n for n in inspect.signature(chosen).parameters if n != "self"]
        raise ConfigError(
            f"strategy_options: {sorted(config.strategy_options)} are not options of the "
            f"{config.strategy!r} strategy (its options: {', '.join(known) or 'none'})"
        ) from None


def _schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the learning-rate schedule over ``steps`` optimizer steps (``config.schedule``)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    end = 0.0 if config.schedule == "linear" else 1.0
    return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, end, total_iters=steps)


def _start(config: TrainConfig, compounds: Sequence[Compound]) -> float:
    """Return the per-pose starting value whose combination is the mean training value.

    Over a compound of the typical (median) number of poses: the mean itself for
    ``mean``, a little above it for a smooth minimum.
    """
    mean = float(torch.stack([c.target for c in compounds]).double().mean())
    poses = int(torch.tensor([len(c.poses) for c in compounds]).median())
    with torch.no_grad():
        flat = torch.full((poses,), mean, dtype=torch.float64)
        combined = float(_checked_combination(config).value(flat))
    start = 2 * mean - combined
    return start if math.isfinite(start) else mean


def _build(config: TrainConfig, data: Dataset, device: torch.device, ranks: Ranks) -> _Run:
    """Move the data, set the validation compounds aside, build the model and optimizer."""
    train_set, val_set = data.train, tuple[Compound, ...]()
    if config.val_fraction > 0:
        if len(data.train) < 2:
            raise ConfigError(
                f"val_fraction: {len(data.train)} training compound cannot be split for "
                "validation; use more compounds or val_fraction=0"
            )
        train_set, val_set = split_compounds(data.train, config.val_fraction, config.seed + 2)
    moved = dataclasses.replace(
        data, train=_moved(train_set, device), test=_moved(data.test, device)
    )
    targets = torch.stack([c.target for c in train_set]).double()
    spread = float(targets.std(correction=0)) if len(targets) > 1 else 0.0
    start = _start(config, train_set)
    model = build_model(config, data.features, start, device, spread or 1.0, data.kind)
    trainer: torch.nn.Module = model
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        trainer = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = math.ceil(len(train_set) / config.batch_size)
    schedule = _schedule(config, optimizer, config.epochs * steps)
    progress = _Progress(shuffle=torch.Generator().manual_seed(config.seed + 1).get_state())
    return _Run(
        config,
        moved,
        device,
        ranks,
        model,
        trainer,
        optimizer,
        schedule,
        progress,
        _moved(val_set, device),
    )


def _diverged(run: _Run, epoch: int, what: str) -> TrainingDivergedError:
    """Say what was measured and what likely caused it; epoch 0: the final verdict.

    Epoch 0 is the verdict on the trained model, reached by every rank together.
    """
    lr, dtype = run.config.lr, run.config.dtype
    initial = run.progress.initial_rmse
    values = [float(c.target) for c in (*run.data.train, *run.val, *run.data.test)]
    spread = float(torch.tensor(values, dtype=torch.float64).std(correction=0))
    if epoch:
        measured = f"in epoch {epoch} (a training batch): {what}"
        causes = [
            f"a learning rate too high (lower the learning rate (lr={lr:g}))",
            f"a network whose output overflows in {dtype} (try dtype=float64)",
        ]
    else:
        measured = f": {what}"
        causes = [f"a learning rate too high (lower the learning rate (lr={lr:g}))"]
    if spread > 0 and initial > DIVERGENCE_FACTOR * spread:
        causes.insert(
            0,
            f"values whose spread ({spread:.3g}) is far below the untrained model's error "
            f"(training RMSE {initial:.3g} before the first step), which no learning rate "
            "fixes: rescale the values or set normalize_targets=true",
        )
    return TrainingDivergedError(
        f"training diverged{' ' if epoch else ''}{measured}; likely causes: {'; or '.join(causes)}",
        same_on_every_rank=epoch == 0,
    )


def _step(run: _Run, batch: Sequence[Compound], epoch: int) -> float:
    """One optimizer step on ``batch``; return this rank's sum of squared errors.

    The loss is the mean squared error over the whole batch: each rank weighs its share
    by ``world / len(batch)`` and DistributedDataParallel averages over the ranks. A
    rank left without compounds (a batch smaller than the number of ranks) takes part
    in the backward with weight 0.
    """
    local = run.ranks.shard(batch)
    weight = run.ranks.world / len(batch)
    if not local:
        local, weight = list(batch[:1]), 0.0
    run.optimizer.zero_grad(set_to_none=True)
    try:
        combined, _, _ = run.trainer(compounds=[list(c.poses) for c in local])
    except combframe.CombinationError as exc:  # non-finite per-pose predictions
        raise _diverged(run, epoch, str(exc).split(";")[0]) from None
    squared = (combined - torch.stack([c.target for c in local])) ** 2
    (squared.sum() * weight).backward()
    total = float(squared.detach().sum()) if weight else 0.0
    if not math.isfinite(total):
        raise _diverged(run, epoch, f"the loss is {total}")
    run.optimizer.step()
    run.schedule.step()
    return total


def _stop_now(run: _Run, stop: StopRequest) -> int:
    """Return the signal that asks every rank to stop (0: go on); ranks agree on it."""
    return int(run.ranks.max(float(stop.signum))) if run.ranks.active else stop.signum


def _epoch(run: _Run, bar: Any, stop: StopRequest) -> None:
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
        if epoch == 1 and k == 0 and run.config.memory and run.device.type == "cpu":
            step = functools.partial(_step, run, batch, epoch)
            loss, p.peak_bytes, p.peak_kind = measure_step(step, run.device)
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
    _end_epoch(run, math.sqrt(total / n_train))


def _interrupted(run: _Run, signum: int) -> RunInterruptedError:
    p = run.progress
    where = f"in epoch {p.epoch + 1} after batch {p.step}" if p.step else f"after epoch {p.epoch}"
    folder = run.folder
    resume = f"; continue with `combframe train --resume {folder}`" if folder else ""
    return RunInterruptedError(
        f"stopped by {signal.Signals(signum).name} {where}; checkpoint written{resume}",
        signum,
        folder,
    )


def _predict(run: _Run, compounds: Sequence[Compound]) -> tuple[Tensor, Tensor]:
    """Predict ``compounds``; return predictions and values, float64 on the CPU, in order."""
    local = run.ranks.shard(compounds)
    parts = []
    with torch.no_grad():
        for i in range(0, len(local), _EVAL_BATCH):
            chunk = local[i : i + _EVAL_BATCH]
            parts.append(run.model(compounds=[list(c.poses) for c in chunk]).combined)
    pred = torch.cat(parts) if parts else torch.zeros(0)
    pred = run.ranks.gather(pred.detach().double().cpu())
    target = torch.stack([c.target for c in compounds]).detach().double().cpu()
    return pred, target


def _end_epoch(run: _Run, train_rmse: float) -> None:
    """Evaluate after an epoch, keep the best model, decide on early stopping, save."""
    p = run.progress
    row = {"epoch": p.epoch, "train_rmse": train_rmse}
    if run.val:
        row["val_rmse"] = rmse(*_predict(run, run.val))
        if row["val_rmse"] < p.best_rmse:
            p.best_epoch, p.best_rmse, p.stale = p.epoch, row["val_rmse"], 0
            p.best_model = copy.deepcopy(run.model.state_dict())
        else:
            p.stale += 1
        patience = run.config.patience
        p.stopped_early = patience is not None and p.stale >= patience
    row["test_rmse"] = rmse(*_predict(run, run.data.test))
    row["lr"] = float(run.optimizer.param_groups[0]["lr"])
    row["seconds"] = p.seconds[-1]
    p.history.append(row)
    if run.folder is not None and run.ranks.main:
        _save_checkpoint(run)
        write_epoch_logs(run.folder, p.history, run.config.tensorboard)


def _save_checkpoint(run: _Run) -> None:
    """Write the run's checkpoint (rank 0, with a run folder): everything to resume."""
    if run.folder is None or not run.ranks.main:
        return
    p = run.progress
    state = {
        "format": 1,
        "config": run.config.model_dump(mode="json"),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "progress": {f.name: getattr(p, f.name) for f in fields(p)},
    }
    save_checkpoint(run.folder, state)


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Continue ``run`` from a checkpoint written by :func:`_save_checkpoint`."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    run.progress = _Progress(**state["progress"])
    if not run.ranks.main:
        run.progress.partial = 0.0  # rank 0 carries the sum of every rank's share


def _fit(run: _Run, progress: bool, stream: TextIO | None) -> None:
    """Train the remaining epochs, checkpointing each (and on SIGTERM or SIGINT)."""
    steps = math.ceil(len(run.data.train) / run.config.batch_size)
    bar = _progress_bar(
        run.config.epochs * steps,
        f"train {run.config.combination.name}",
        stream if stream is not None else sys.stderr,
        progress and run.ranks.main,
    )
    p = run.progress
    if p.epoch == 0 and p.step == 0:
        p.initial_rmse = rmse(*_predict(run, run.data.train))  # for the divergence message
        _save_checkpoint(run)  # a run killed in its first epoch resumes from the start
    bar.update(p.epoch * steps + p.step)
    lines = not _is_terminal(stream) and run.ranks.main and progress
    with bar, stop_on_signals() as stop, _cuda_peak(run):
        while p.epoch < run.config.epochs and not p.stopped_early:
            _epoch(run, bar, stop)
            p = run.progress
            bar.set_postfix(train_rmse=f"{p.history[-1]['train_rmse']:.3f}")
            if lines:
                _epoch_line(run, stream)
            signum = _stop_now(run, stop)
            if signum and p.epoch < run.config.epochs and not p.stopped_early:
                raise _interrupted(run, signum)


@contextmanager
def _cuda_peak(run: _Run) -> Iterator[None]:
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


def _is_terminal(stream: TextIO | None) -> bool:
    file = stream if stream is not None else sys.stderr
    return bool(hasattr(file, "isatty") and file.isatty())


def _epoch_line(run: _Run, stream: TextIO | None) -> None:
    """One line per epoch where no progress bar is drawn (a log file, a pipe)."""
    row = run.progress.history[-1]
    cells = [f"epoch {row['epoch']:.0f}/{run.config.epochs}"]
    cells += [f"{k} {row[k]:.4g}" for k in ("train_rmse", "val_rmse", "test_rmse") if k in row]
    cells.append(f"{row['seconds']:.2f} s")
    print("  ".join(cells), file=stream if stream is not None else sys.stderr, flush=True)


def _held_out(run: _Run) -> tuple[dict[str, Any], list[str]]:
    """Compute held-out metrics (None where undefined) with 95% intervals, and notes."""
    pred, target = _predict(run, run.data.test)
    test, notes = held_out_metrics(pred, target, seed=run.config.seed)
    mean_train = torch.stack([c.target for c in run.data.train]).double().mean().cpu()
    baseline = rmse(mean_train.expand_as(target), target)
    test["mean_value_rmse"] = baseline
    skipped = run.data.skipped
    for note in (
        baseline_note(test["rmse"], baseline),
        tensorboard_note() if run.config.tensorboard else None,
        skipped_note(skipped),
    ):
        if note is not None:
            notes.append(note)
    return test, notes


def _metrics(run: _Run) -> RunResult:
    """Evaluate the trained model, check for divergence and assemble ``metrics.json``."""
    test, notes = _held_out(run)
    train_pred, train_target = _predict(run, run.data.train)
    train_rmse = rmse(train_pred, train_target)
    values = [float(c.target) for c in (*run.data.train, *run.val, *run.data.test)]
    why = divergence(train_rmse, test["rmse"], values)
    if why is not None:
        raise _diverged(run, 0, why)
    p = run.progress
    resolved = run.config.model_dump(mode="json")
    metrics: dict[str, Any] = {
        "combination": resolved["combination"],
        "strategy": run.config.strategy,
        "device": str(run.device),
        "processes": run.ranks.world,
        "data": {
            "source": run.data.source,
            "kind": run.data.kind,
            "features": run.data.features,
            "skipped": len(run.data.skipped),
        },
        "test": test,
        "train": {"rmse": train_rmse, "compounds": len(run.data.train)},
        "validation": _validation(run),
        "epochs_trained": p.epoch,
        "stopped_early": p.stopped_early,
        "time_per_epoch_s": sum(p.seconds) / len(p.seconds),
        "peak_memory_bytes": _peak_bytes(run),
        "peak_memory_kind": p.peak_kind or "not measured (memory=false)",
        "process_peak_rss_mb": process_peak_rss_mb(),
        "history": p.history,
        "versions": _versions(),
    }
    return RunResult(combination=resolved["combination"], metrics=metrics, notes=notes)


def _peak_bytes(run: _Run) -> int | None:
    peak = int(run.ranks.max(float(run.progress.peak_bytes)))
    return peak if run.config.memory else None


def _validation(run: _Run) -> dict[str, Any] | None:
    if not run.val:
        return None
    p = run.progress
    return {"compounds": len(run.val), "best_epoch": p.best_epoch, "best_rmse": p.best_rmse}


def _versions() -> dict[str, str]:
    return {"combframe": combframe.__version__, "torch": torch.__version__}


def _save_models(run: _Run, folder: Path) -> None:
    """Write the final model and, with a validation split, the best one."""
    p = run.progress
    info = {
        "config": run.config.model_dump(mode="json"),
        "network": {"features": run.data.features, "kind": run.data.kind},
        "versions": _versions(),
    }
    save_model(folder, "final", run.model.state_dict(), {**info, "epoch": p.epoch})
    if p.best_model is not None:
        best = {**info, "epoch": p.best_epoch, "val_rmse": p.best_rmse}
        save_model(folder, "best", p.best_model, best)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(
    config: TrainConfig,
    data: Dataset,
    ranks: Ranks,
    folder: Path | None,
    progress: bool,
    stream: TextIO | None,
    resume: dict[str, Any] | None = None,
) -> RunResult:
    device = check_config(config, ranks)
    with _torch_threads(config.threads):
        run = _build(config, data, device, ranks)
        run.folder = folder if ranks.main else None
        if resume is not None:
            _restore(run, resume)
        _fit(run, progress, stream)
        result = _metrics(run)
        if run.folder is not None:
            try:
                _save_models(run, run.folder)
            except OSError as exc:
                raise RunWriteError(f"cannot write the model: {exc}", result) from None
    if folder is not None and ranks.main:
        write_run(folder, config.model_dump(mode="json"), result)
    return result


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
        return _run(config, data, ranks, run_dir if write else None, progress, stream)
    with claimed_run_dir(config, ranks) as folder:
        return _run(config, data, ranks, folder, progress, stream)


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
        return _run(config, data, ranks, claimed or folder, progress, stream, state)


def _resumable(folder: Path) -> dict[str, Any]:
    status = read_status(folder)
    if status.get("state") == "completed":
        raise CheckpointError(
            f"{str(folder)!r} holds a completed run; nothing to resume (train longer "
            f"with --config {str(folder / 'config.yaml')!r} epochs=N into a new folder)"
        )
    return load_checkpoint(folder)


def parse_compare(text: str) -> tuple[str, list[str]]:
    """Split ``--compare``: ``max,mean`` or ``KEY=V1,V2,...``; return the key and values.

    Raises
    ------
    ConfigError
        If no value is given.
    """
    key, sep, values = text.partition("=")
    if not sep:
        key, values = "combination.name", text
    cleaned = [v.strip() for v in values.split(",") if v.strip()]
    if not key.strip() or not cleaned:
        raise ConfigError(
            "--compare: give combination names (max,mean) or KEY=V1,V2,... "
            f"(strategy=store,stream); got {text!r}"
        )
    return key.strip(), cleaned


def compare(
    config: TrainConfig,
    values: Sequence[str],
    *,
    key: str = "combination.name",
    progress: bool = True,
    write: bool = True,
    stream: TextIO | None = None,
    ranks: Ranks | None = None,
) -> tuple[list[RunResult], Path | None]:
    """Train once per value of ``key``, everything else as in ``config``.

    ``key`` is a dotted config key, as in an override. For ``combination.name``, a name
    equal to the configured combination's keeps the configured parameters; the others
    use their defaults. Runs go to subfolders of one run folder, next to a
    ``compare.json`` with the table.

    Raises
    ------
    ConfigError
        If a value is invalid, not installed or its data cannot be read, before any run.
    """
    ranks = ranks or Ranks()
    configs = _compare_configs(config, key, values)
    datasets: dict[str, Dataset] = {}
    for cfg in configs:  # refuse before the first run, not after it
        check_config(cfg, ranks)
        if _data_key(cfg) not in datasets:
            datasets[_data_key(cfg)] = load_data(cfg)
    runs = [
        (cfg, datasets[_data_key(cfg)], f"{key}={value}")
        for cfg, value in zip(configs, values, strict=True)
    ]
    if not write:
        results = [_run(cfg, data, ranks, None, progress, stream) for cfg, data, _ in runs]
        return [_labelled(r, label) for r, (_, _, label) in zip(results, runs, strict=True)], None
    with claimed_run_dir(config, ranks) as top:
        results = []
        for i, (cfg, data, label) in enumerate(runs):
            leaf = label.partition("=")[2].replace("/", "_").replace("\\", "_")
            folder = None if top is None else top / f"{i + 1}-{leaf}"
            if folder is not None:
                folder.mkdir()
                write_status(folder, "running")
            with claimed_run_dir(cfg, ranks, existing=folder):  # marks a failed run
                result = _run(cfg, data, ranks, folder, progress, stream)
            results.append(_labelled(result, label))
        if top is not None:
            _write_table(top, results)
            write_status(top, "completed")
    return results, top


def _labelled(result: RunResult, label: str) -> RunResult:
    result.label = label
    return result


def _data_key(config: TrainConfig) -> str:
    """Return the settings that make the data of a run, as one string."""
    fields = ("data", "reader", "dtype", "seed", "test_fraction", *SYNTHETIC_KEYS)
    return json.dumps(config.model_dump(mode="json", include=set(fields)), sort_keys=True)


def _compare_configs(config: TrainConfig, key: str, values: Sequence[str]) -> list[TrainConfig]:
    base = config.model_dump(mode="json")
    configs = []
    for value in values:
        override = f"{key}={value}"
        try:
            data = apply_overrides(base, [override])
            configs.append(TrainConfig.model_validate(data))
        except ConfigError as exc:
            raise ConfigError(f"--compare {override}: {exc}") from None
        except ValidationError as exc:
            known = list(TrainConfig.model_fields)
            error = format_validation_error(exc, known_fields=known)
            raise ConfigError(f"--compare {override}: {error}") from None
    return configs


def _write_table(top: Path, results: Sequence[RunResult]) -> None:
    table = [
        {
            "run": r.label,
            "combination": r.combination,
            "test": r.metrics["test"],
            "run_dir": str(r.run_dir),
        }
        for r in results
    ]
    (top / "compare.json").write_text(json.dumps(table, indent=2) + "\n")


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed (or progress is off)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress_bar(total: int, desc: str, file: TextIO, enabled: bool) -> Any:
    """Return a tqdm progress bar on a terminal when tqdm is installed (``progress`` extra).

    Nothing is drawn into a file or a pipe (logs, torchrun's output); on a terminal
    without tqdm one line says how to get the bar.
    """
    if not enabled or not (hasattr(file, "isatty") and file.isatty()):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        print("note: no progress bar: pip install 'combframe[progress]' (tqdm)", file=file)
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        file=file,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
