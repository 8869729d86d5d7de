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
from combframe.app.priors import check_priors, log_priors

__all__ = [
    "Progress",
    "Run",
    "build_model",
    "build_run",
    "check_config",
    "checked_combination",
    "chunk_size",
    "compound_values",
    "strategy_of",
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
    """Build the combination, refusing a strategy it does not support.

    Also refused: a combination that does not turn one value per pose into one value
    (``gated_attention`` with ``dim`` > 1 pools embeddings): a run's networks return
    one value per pose and its loss is on one value per compound. Its layers, if it has
    some, are drawn from the global generator (:func:`build_model` seeds it).
    """
    combination = config.combination.build()
    if config.strategy == "stream" and not isinstance(combination, combframe.StreamingCombination):
        raise ConfigError(
            f"strategy: 'stream' needs a streaming combination and {combination.name!r} "
            "does not implement stream_terms; use strategy=store or strategy=recompute"
        )
    try:
        with torch.no_grad():
            shape = tuple(combination.double().value(torch.zeros(2, dtype=torch.float64)).shape)
        why = f" (it returns shape {shape})"
    except combframe.CombinationError as exc:
        shape, why = None, f" ({exc})"
    if shape != ():
        raise ConfigError(
            f"combination: {combination.name!r} does not combine one value per pose into "
            f"one{why}, but combframe train's networks return one value per pose and fit "
            "one value per compound; use dim=1 for a pooling combination, or the Python "
            "API (MultiPoseModel with a comb_readout) for vector outputs"
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
        combination = checked_combination(config)  # its own layers (attention's), seeded
    model = combframe.MultiPoseModel(
        net, combination, strategy=strategy_of(config), chunk_size=chunk_size(config, kind)
    )
    return model.to(device=device, dtype=dtype_of(config))  # the combination's layers too


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


def compound_values(model: torch.nn.Module, compounds: Sequence[Compound]) -> Tensor:
    """Return ``model``'s ``(C,)`` values of ``compounds`` (their poses, with their priors).

    ``model`` is a run's :class:`combframe.MultiPoseModel` (or its distributed wrapper);
    the graph is kept in grad mode.

    Raises
    ------
    ConfigError
        If the network returns more than one value per pose (a ``model.name`` import
        path with vector outputs): the squared error against one value per compound
        would broadcast, silently, where the counts happen to match.
    """
    out = model(compounds=[list(c.poses) for c in compounds], prior=log_priors(compounds))
    combined: Tensor = out.combined
    if combined.shape != (len(compounds),):
        raise ConfigError(
            f"model.name: the network returns {tuple(out.per_pose.shape[1:])} values per "
            f"pose (combined: {tuple(combined.shape)} for {len(compounds)} compounds), but "
            "combframe train fits one value per compound; return one value per pose "
            "(shape (b,) for b poses), or use the Python API (MultiPoseModel with a "
            "comb_readout) for vector outputs"
        )
    return combined


def _moved(compounds: Sequence[Compound], device: torch.device) -> tuple[Compound, ...]:
    return tuple(c.to(device) for c in compounds)


def _start(config: TrainConfig, compounds: Sequence[Compound]) -> float:
    """Return the per-pose starting value whose combination is the mean training value.

    Over a compound of the typical (median) number of poses: the mean itself for
    ``mean``, a little above it for a smooth minimum.
    """
    mean = float(torch.stack([c.target for c in compounds]).double().mean())
    poses = int(torch.tensor([len(c.poses) for c in compounds]).median())
    with torch.no_grad():
        flat = torch.full((poses,), mean, dtype=torch.float64)
        combined = float(checked_combination(config).value(flat))  # in float64
    start = 2 * mean - combined
    return start if math.isfinite(start) else mean


def _schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the learning-rate schedule over ``steps`` optimizer steps (``config.schedule``)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    end = 0.0 if config.schedule == "linear" else 1.0
    return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, end, total_iters=steps)
