"""Building a run of ``combframe train``: what pydantic cannot check, the model, the rest.

:func:`check_config` refuses what only the library can judge (the combination and its
strategy, the device) before any data is read; :func:`build_model` makes a run's
:class:`combframe.MultiPoseModel` (training and :func:`combframe.app.load` both call it);
:func:`build_run` sets the validation compounds aside and builds the optimizer and its
schedule around the model, into a :class:`Run` whose :class:`Progress` the training loop
(:mod:`combframe.app.train`) advances.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import combframe
from combframe.app.config import ConfigError, TrainConfig
from combframe.app.data import Compound, Dataset, split_compounds
from combframe.app.distributed import Ranks
from combframe.app.loading import dtype_of
from combframe.app.models import DataInfo, build_network
from combframe.app.priors import check_priors

__all__ = [
    "Progress",
    "Run",
    "build_model",
    "build_run",
    "check_config",
    "check_outputs",
    "checked_combination",
    "chunk_size",
    "strategy_of",
    "target_stats",
]


def check_config(config: TrainConfig, ranks: Ranks | None = None) -> torch.device:
    """Check what pydantic cannot (combination, strategy, prior, device); return the device.

    Raises
    ------
    ConfigError
        If the device is unavailable, or the strategy or a prior (``prior.field``,
        ``mask.field``) does not fit the combination.
    """
    checked_combination(config)
    check_priors(config)
    strategy_of(config)
    return _resolve_device(config.device, ranks or Ranks())


def checked_combination(config: TrainConfig) -> combframe.Combination:
    """Build the combination (in float64), refusing a strategy it does not support.

    Also refused: a combination that does not turn the run's values per pose (one, or
    one per target of ``reader.target``) into as many per compound, such as
    ``gated_attention`` with another ``dim``: a run's loss is on them. Its layers, if it
    has some, are drawn from the global generator (:func:`build_model` seeds it).
    """
    combination = config.combination.build()
    if config.strategy == "stream" and not isinstance(combination, combframe.StreamingCombination):
        raise ConfigError(
            f"strategy: 'stream' needs a streaming combination and {combination.name!r} "
            "does not implement stream_terms; use strategy=store or strategy=recompute"
        )
    d = len(config.reader.targets)
    values = f"{d} values (one per target)" if d else "one value"
    try:
        with torch.no_grad():
            probe = torch.zeros((2, d) if d else (2,), dtype=torch.float64)
            shape = tuple(combination.double().value(probe).shape)
        why = f" (it returns shape {shape})"
    except combframe.CombinationError as exc:
        shape, why = None, f" ({exc})"
    if shape != tuple(probe.shape[1:]):
        raise ConfigError(
            f"combination: {combination.name!r} does not combine {values} per pose into "
            f"as many{why}, but combframe train's networks return {values} per pose and "
            f"fit {values} per compound; give a pooling combination dim={max(d, 1)}, or "
            "use the Python API (MultiPoseModel with a comb_readout) to pool embeddings"
        )
    return combination


def strategy_of(config: TrainConfig) -> Any:
    """Return the configured strategy, built with ``strategy_options``."""
    cls = {
        "store": combframe.Store,
        "recompute": combframe.Recompute,
        "stream": combframe.Stream,
        "auto": combframe.Auto,
    }
    chosen = cls[config.strategy]
    # training's loss is on the combined predictions only
    options = {"losses": "combined"} if config.strategy == "auto" else {}
    try:
        return chosen(**(options | config.strategy_options))
    except TypeError:
        known = [n for n in inspect.signature(chosen).parameters if n != "self"]
        raise ConfigError(
            f"strategy_options: {sorted(config.strategy_options)} are not options of the "
            f"{config.strategy!r} strategy (its options: {', '.join(known) or 'none'})"
        ) from None


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


#: A number per output: one (a float), or one per target.
Numbers = float | tuple[float, ...]


def build_model(
    config: TrainConfig,
    features: int,
    output_bias: Numbers = 0.0,
    device: torch.device | str = "cpu",
    output_scale: Numbers = 1.0,
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
    then loads the weights (the offsets and scale too). With several targets
    (``config.reader.targets``, d names) the network has d outputs, and ``output_bias``
    and ``output_scale`` are one per target (a number is taken for every target).
    """
    outputs = len(config.reader.targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net: torch.nn.Module
        bias = _per_output(output_bias, outputs)
        if config.normalize_targets:
            zero = _per_output(0.0, outputs)
            inner = build_network(config, DataInfo(kind, features, zero, outputs))
            net = _Standardized(inner, bias, _per_output(output_scale, outputs))
        else:
            net = build_network(config, DataInfo(kind, features, bias, outputs))
        combination = checked_combination(config)  # its own layers (attention's), seeded
    dtype = dtype_of(config)  # the combination's layers too
    return combframe.MultiPoseModel(
        net.to(device=device, dtype=dtype),
        combination.to(device=device, dtype=dtype),
        strategy=strategy_of(config),
        chunk_size=chunk_size(config, kind),
    )


def _per_output(value: Numbers, outputs: int) -> Numbers:
    """``value`` for each of ``outputs`` targets (a number repeated); as is for one value."""
    return (value,) * outputs if outputs and isinstance(value, float) else value


class _Standardized(torch.nn.Module):
    """A network trained on standardised values: its output times ``scale`` plus ``shift``.

    Several targets: ``shift`` and ``scale`` are one per target (column).
    """

    def __init__(self, net: torch.nn.Module, shift: Numbers, scale: Numbers) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("shift", torch.tensor(shift))
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: Any) -> Tensor:
        out: Tensor = self.net(x) * self.scale + self.shift
        return out


def chunk_size(config: TrainConfig, kind: str) -> int:
    """Poses per network call: ``config.chunk_size``, else 16 for molecules, otherwise 1.

    ``strategy=store`` takes molecules one per call: its per-pose gradients of a chunk
    come from ``torch.func.vmap``, which cannot map over a PyG ``Batch``.
    """
    if config.chunk_size is not None:
        return config.chunk_size
    return 16 if kind == "molecules" and config.strategy != "store" else 1


@dataclass
class Progress:
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
class Run:
    """A run being trained: its settings, data, model, optimizer and progress."""

    config: TrainConfig
    data: Dataset
    device: torch.device
    ranks: Ranks
    model: combframe.MultiPoseModel
    trainer: torch.nn.Module  # the model, or the model wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    val: tuple[Compound, ...] = ()
    folder: Path | None = None


def build_run(config: TrainConfig, data: Dataset, device: torch.device, ranks: Ranks) -> Run:
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
    start, spread = _start(config, train_set, data.targets)
    model = build_model(config, data.features, start, device, spread, data.kind)
    check_outputs(model, moved.train[0], data.targets, config.model.name)
    trainer: torch.nn.Module = model
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        trainer = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = math.ceil(len(train_set) / config.batch_size)
    schedule = _schedule(config, optimizer, config.epochs * steps)
    progress = Progress(shuffle=torch.Generator().manual_seed(config.seed + 1).get_state())
    return Run(
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


def _moved(compounds: Sequence[Compound], device: torch.device) -> tuple[Compound, ...]:
    return tuple(c.to(device) for c in compounds)


def _start(
    config: TrainConfig, compounds: Sequence[Compound], names: Sequence[str] = ()
) -> tuple[Numbers, Numbers]:
    """Return the per-pose starting value and the values' spread (for ``normalize_targets``).

    The start is the value whose combination is the mean training value, over a
    compound of the typical (median) number of poses: the mean itself for ``mean``, a
    little above it for a smooth minimum. The spread is the standard deviation of the
    training values (1 where it is 0). Several targets: both per target, over the
    compounds that have a value for it (:func:`target_stats`).
    """
    mean, std = target_stats(compounds, names)
    poses = int(torch.tensor([len(c.poses) for c in compounds]).median())
    with torch.no_grad():
        flat = mean.expand(poses, *mean.shape)
        combined = checked_combination(config).value(flat)
    start = torch.where((2 * mean - combined).isfinite(), 2 * mean - combined, mean)
    std = torch.where(std > 0, std, 1.0)
    if names:
        return tuple(start.tolist()), tuple(std.tolist())
    return float(start), float(std)


def target_stats(compounds: Sequence[Compound], names: Sequence[str] = ()) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the compounds' values; per target with ``names``.

    Several targets: over the compounds with a value for each (NaN is missing).

    Raises
    ------
    ConfigError
        If no compound has a value for one of ``names``.
    """
    y = torch.stack([c.target for c in compounds]).detach().double().cpu()
    if not names:
        return y.mean(), y.std(correction=0) if len(y) > 1 else torch.zeros(())
    present = y.isfinite()
    n = present.sum(dim=0)
    for name, count in zip(names, n.tolist(), strict=True):
        if not count:
            raise ConfigError(
                f"reader.target: no training compound has a value for {name!r}; give more "
                "compounds a value for it or a smaller test_fraction"
            )
    mean = torch.where(present, y, 0.0).sum(dim=0) / n
    var = (torch.where(present, y - mean, 0.0) ** 2).sum(dim=0) / n
    return mean, var.sqrt()


def check_outputs(
    model: combframe.MultiPoseModel, compound: Compound, names: Sequence[str], network: str
) -> None:
    """Refuse a network that does not return one value per target for each pose.

    Runs the model, in eval mode, on the first pose of ``compound``; the combined value
    must have shape ``(1,)`` for one value per compound (no ``names``), ``(1, d)`` for
    the d ``names``. Otherwise the squared error against the values would broadcast,
    silently where the counts happen to match.
    """
    mode = model.training
    try:
        with torch.no_grad():
            combined = model.eval()(compounds=[list(compound.poses)[:1]]).combined
    finally:
        model.train(mode)
    want = (1, len(names)) if names else (1,)
    if tuple(combined.shape) != want:
        what = f"{len(names)} targets ({', '.join(names)})" if names else "one target"
        shape = f"(b, {len(names)}), one column per target" if names else "(b,)"
        raise ConfigError(
            f"model.name {network!r}: with {what} the network must return shape {shape}, "
            f"for b poses; it returned per-pose values of shape {tuple(combined.shape[1:])} "
            "per compound"
        )


def _schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the learning-rate schedule over ``steps`` optimizer steps (``config.schedule``)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    end = 0.0 if config.schedule == "linear" else 1.0
    return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, end, total_iters=steps)
