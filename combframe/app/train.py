"""Training for ``combframe train``: data, model, loop, metrics and the run folder.

:func:`train` fits a small single-pose network wrapped in :class:`combframe.MultiPoseModel`
to compound-level values (the built-in synthetic set of :mod:`combframe.app.data` or a
user's compounds file) and reports held-out metrics; :func:`compare` does so once per
combination. Each optimizer step runs one batch of compounds through one
``model(compounds=...)`` call and one backward. Under ``torchrun`` the batch is shared
out over the processes (:mod:`combframe.app.distributed`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from pydantic import ValidationError
from torch import Tensor

import combframe
from combframe.app.config import (
    SYNTHETIC_KEYS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_validation_error,
)
from combframe.app.data import Compound, DataError, load_compounds, make_dataset, split_compounds
from combframe.app.distributed import Ranks
from combframe.app.memory import measure_step, process_peak_rss_mb
from combframe.app.metrics import (
    baseline_note,
    divergence,
    pearson,
    rmse,
    spearman,
    undefined_correlation,
)
from combframe.app.models import DataInfo, build_network
from combframe.app.readers import BUILT_IN, is_molecular, read_molecules
from combframe.app.runs import RunResult, claimed_run_dir, write_run

__all__ = [
    "Dataset",
    "RunResult",
    "TrainingDivergedError",
    "check_config",
    "compare",
    "load_data",
    "parse_compare",
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

    def info(self, combination: combframe.Combination) -> DataInfo:
        """Describe the data for the network: kind, features and starting prediction.

        The starting prediction is the per-pose value whose ``combination`` over a
        compound of the typical (median) number of poses is the training compounds'
        mean value: the mean itself for ``mean``, a little above it for a smooth minimum.
        """
        mean = float(torch.stack([c.target for c in self.train]).double().mean())
        poses = int(torch.tensor([len(c.poses) for c in self.train]).median())
        with torch.no_grad():
            combined = float(combination.value(torch.full((poses,), mean, dtype=torch.float64)))
        start = 2 * mean - combined
        return DataInfo(self.kind, self.features, start if math.isfinite(start) else mean)


def _dtype(config: TrainConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


def load_data(config: TrainConfig) -> Dataset:
    """Load the compounds of a run, split: the one entry point for every input format.

    The built-in synthetic set (``data`` unset), a JSON file of feature vectors, or
    molecules (a built-in real set by name, an SDF, SMILES, a manifest; see
    :mod:`combframe.app.readers` and ``docs/data.md``).

    Raises
    ------
    ConfigError
        ``data: <file>: <record> (<compound>): <problem>`` for input that cannot be used.
    """
    if is_molecular(config.data):
        return _molecules(config)
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
        return Dataset(built_in.train, built_in.test, built_in.features, "built-in")
    try:
        compounds = load_compounds(config.data, dtype=_dtype(config))
    except DataError as exc:
        raise ConfigError(f"data: {exc}") from None
    train_set, test_set = split_compounds(compounds, config.test_fraction, config.seed)
    first = compounds[0].poses
    features = int(first.shape[-1]) if isinstance(first, Tensor) else 0
    return Dataset(train_set, test_set, features, str(config.data))


def _molecules(config: TrainConfig) -> Dataset:
    try:
        read = read_molecules(str(config.data), config.reader, _dtype(config))
    except DataError as exc:
        raise ConfigError(f"data: {exc}") from None
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
    return _resolve_device(config.device, ranks or Ranks())


# ---- one run ------------------------------------------------------------------------


@dataclass
class _Run:
    """A run being trained: its settings, data, model and optimizer."""

    config: TrainConfig
    data: Dataset
    device: torch.device
    ranks: Ranks
    model: combframe.MultiPoseModel
    trainer: torch.nn.Module  # the model, or the model wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    peak_bytes: int = 0
    peak_kind: str = ""


def chunk_size(config: TrainConfig, kind: str) -> int:
    """Poses per network call: ``config.chunk_size``, else 16 for molecules, otherwise 1.

    ``strategy=store`` takes molecules one per call: its per-pose gradients of a chunk
    come from ``torch.func.vmap``, which cannot map over a PyG ``Batch``.
    """
    if config.chunk_size is not None:
        return config.chunk_size
    return 16 if kind == "molecules" and config.strategy != "store" else 1


def _moved(compound: Compound, device: torch.device) -> Compound:
    """``compound`` with its poses (tensor or ``Data``) and target on ``device``."""
    poses = compound.poses
    moved = poses.to(device) if isinstance(poses, Tensor) else tuple(p.to(device) for p in poses)
    return Compound(moved, compound.target.to(device), name=compound.name)


def _build(config: TrainConfig, data: Dataset, device: torch.device, ranks: Ranks) -> _Run:
    """Move the data, build the model (seeded) and the optimizer."""
    moved = dataclasses.replace(
        data,
        train=tuple(_moved(c, device) for c in data.train),
        test=tuple(_moved(c, device) for c in data.test),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        combination = _checked_combination(config)
        net = build_network(config, data.info(combination))
    net = net.to(device=device, dtype=_dtype(config))
    model = combframe.MultiPoseModel(
        net,
        combination,
        strategy=config.strategy,
        chunk_size=chunk_size(config, data.kind),
    )
    trainer: torch.nn.Module = model
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        trainer = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    steps = math.ceil(len(data.train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps)
    return _Run(config, moved, device, ranks, model, trainer, optimizer, schedule)


def _diverged(epoch: int, lr: float, what: str) -> TrainingDivergedError:
    """Epoch 0: the verdict on the trained model, reached by every rank together."""
    where = f" in epoch {epoch}" if epoch else ""
    return TrainingDivergedError(
        f"training diverged{where}: {what}; lower the learning rate (lr={lr:g})",
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
        raise _diverged(epoch, run.config.lr, str(exc).split(";")[0]) from None
    squared = (combined - torch.stack([c.target for c in local])) ** 2
    (squared.sum() * weight).backward()
    total = float(squared.detach().sum()) if weight else 0.0
    if not math.isfinite(total):
        raise _diverged(epoch, run.config.lr, f"the loss is {total}")
    run.optimizer.step()
    run.schedule.step()
    return total


def _epoch(run: _Run, epoch: int, shuffle: torch.Generator, bar: Any) -> tuple[float, float]:
    """Train one epoch; return the sum of squared errors over all ranks and the seconds."""
    start = time.perf_counter()
    n_train = len(run.data.train)
    order = torch.randperm(n_train, generator=shuffle).tolist()
    total = 0.0
    for b in range(0, n_train, run.config.batch_size):
        batch = [run.data.train[i] for i in order[b : b + run.config.batch_size]]
        if epoch == 1 and b == 0:
            step = functools.partial(_step, run, batch, epoch)
            loss, run.peak_bytes, run.peak_kind = measure_step(step, run.device)
            total += loss
        else:
            total += _step(run, batch, epoch)
        bar.update(1)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    return run.ranks.sum(total), seconds


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


def _fit(run: _Run, progress: bool, stream: TextIO | None) -> tuple[list[dict[str, float]], float]:
    """Train every epoch; return the per-epoch history and the mean seconds per epoch."""
    history: list[dict[str, float]] = []
    seconds: list[float] = []
    shuffle = torch.Generator().manual_seed(run.config.seed + 1)
    steps = math.ceil(len(run.data.train) / run.config.batch_size)
    bar = _progress_bar(
        run.config.epochs * steps,
        f"train {run.config.combination.name}",
        stream if stream is not None else sys.stderr,
        progress and run.ranks.main,
    )
    with bar:
        for epoch in range(1, run.config.epochs + 1):
            total, elapsed = _epoch(run, epoch, shuffle, bar)
            seconds.append(elapsed)
            test_pred, test_target = _predict(run, run.data.test)
            history.append(
                {
                    "epoch": epoch,
                    "train_rmse": math.sqrt(total / len(run.data.train)),
                    "test_rmse": rmse(test_pred, test_target),
                }
            )
            bar.set_postfix(
                train_rmse=f"{history[-1]['train_rmse']:.3f}",
                test_rmse=f"{history[-1]['test_rmse']:.3f}",
            )
    return history, sum(seconds) / len(seconds)


def _held_out(run: _Run) -> tuple[dict[str, Any], list[str]]:
    """Compute held-out metrics (None where undefined), with notes saying why."""
    pred, target = _predict(run, run.data.test)
    notes = []
    undefined = undefined_correlation(pred, target)
    if undefined is not None:
        notes.append(f"Pearson and Spearman are n/a: {undefined}")
    mean_train = torch.stack([c.target for c in run.data.train]).double().mean().cpu()
    test_rmse, baseline = rmse(pred, target), rmse(mean_train.expand_as(target), target)
    test = {
        "rmse": test_rmse,
        "pearson": None if undefined else pearson(pred, target),
        "spearman": None if undefined else spearman(pred, target),
        "compounds": len(run.data.test),
        "mean_value_rmse": baseline,
    }
    note = baseline_note(test_rmse, baseline)
    if note is not None:
        notes.append(note)
    if run.data.skipped:
        notes.append(
            f"reader.skip_invalid left out {len(run.data.skipped)} record(s) or "
            f"compound(s); the first: {run.data.skipped[0]}"
        )
    return test, notes


def _metrics(run: _Run, history: list[dict[str, float]], per_epoch: float) -> RunResult:
    """Evaluate the trained model, check for divergence and assemble ``metrics.json``."""
    test, notes = _held_out(run)
    train_pred, train_target = _predict(run, run.data.train)
    train_rmse = rmse(train_pred, train_target)
    values = [float(c.target) for c in (*run.data.train, *run.data.test)]
    why = divergence(train_rmse, test["rmse"], values)
    if why is not None:
        raise _diverged(0, run.config.lr, why)
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
        "time_per_epoch_s": per_epoch,
        "peak_memory_bytes": int(run.ranks.max(float(run.peak_bytes))),
        "peak_memory_kind": run.peak_kind,
        "process_peak_rss_mb": process_peak_rss_mb(),
        "history": history,
        "versions": {"combframe": combframe.__version__, "torch": torch.__version__},
    }
    return RunResult(combination=resolved["combination"], metrics=metrics, notes=notes)


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
) -> RunResult:
    device = check_config(config, ranks)
    with _torch_threads(config.threads):
        run = _build(config, data, device, ranks)
        history, per_epoch = _fit(run, progress, stream)
        result = _metrics(run, history, per_epoch)
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
        Show a tqdm progress bar on ``stream`` (rank 0 only).
    write
        Write the run folder (``config.yaml``, ``metrics.json``, ``loss.png``).
    run_dir
        Folder to write to; default: a new folder under ``config.output_dir``, created
        before training (and removed if the run fails).
    stream
        Where the progress bar goes; default ``sys.stderr``.
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
        spread (the learning rate is too high).
    """
    ranks = ranks or Ranks()
    check_config(config, ranks)
    data = data if data is not None else load_data(config)
    if not write or run_dir is not None:
        return _run(config, data, ranks, run_dir if write else None, progress, stream)
    with claimed_run_dir(config, ranks) as folder:
        return _run(config, data, ranks, folder, progress, stream)


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
            results.append(_labelled(_run(cfg, data, ranks, folder, progress, stream), label))
        if top is not None:
            _write_table(top, results)
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
