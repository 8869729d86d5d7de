"""Training on the built-in dataset: config, overrides, loop, metrics and the run folder.

This is what ``combframe train`` runs. :class:`TrainConfig` is the whole configuration
(a YAML or JSON file and ``key=value`` overrides on top of it); :func:`train` fits a
small single-pose network wrapped in :class:`~combframe.MultiPoseModel` to the
compound-level values of :func:`~combframe.app.data.make_dataset`, reports held-out
metrics and writes a run folder.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from combframe.app.data import Compound, make_dataset
from combframe.core.combination import Combination, StreamingCombination
from combframe.core.model import MultiPoseModel
from combframe.errors import CombinationError
from combframe.registry.config import CombinationConfig

__all__ = [
    "ConfigError",
    "RunResult",
    "TrainConfig",
    "TrainingDivergedError",
    "apply_overrides",
    "compare",
    "load_config",
    "pearson",
    "rmse",
    "spearman",
    "train",
]


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the field."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite during training."""


class TrainConfig(BaseModel):
    """Everything ``combframe train`` needs. Unknown keys are rejected.

    Attributes
    ----------
    combination
        ``{name: ..., <params>}``: the combination by registered name and its parameters.
    strategy
        Gradient strategy of :class:`~combframe.MultiPoseModel`.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    combination: CombinationConfig = Field(
        default_factory=lambda: CombinationConfig(name="max", negate_preds=True),
        description="Combination by registered name, with its parameters.",
    )
    strategy: Literal["store", "recompute", "stream"] = Field(
        "store", description="How per-pose gradients are kept (see MultiPoseModel)."
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating dtype.")
    epochs: int = Field(10, ge=1, description="Passes over the training compounds.")
    lr: float = Field(3e-3, gt=0, description="Initial Adam learning rate (cosine decay).")
    batch_size: int = Field(8, ge=1, description="Compounds per optimizer step.")
    hidden: int = Field(32, ge=1, description="Width of the single-pose network.")
    seed: int = Field(0, ge=0, description="Seed of the data, the initial weights and shuffling.")
    compounds: int = Field(240, ge=2, description="Compounds in the dataset (both splits).")
    poses_per_compound: int = Field(8, ge=1, description="Poses of every compound.")
    features: int = Field(8, ge=1, description="Features of a pose.")
    pose_spread: float = Field(1.0, ge=0, description="Spread of a compound's poses.")
    noise: float = Field(0.1, ge=0, description="Label noise, kcal/mol.")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Share of compounds held out.")
    threads: int | None = Field(
        1, ge=1, description="CPU threads for torch (null keeps torch's default)."
    )
    output_dir: Path = Field(Path("runs"), description="Where run folders are created.")
    name: str | None = Field(None, description="Run folder name; default: a timestamp.")
    plot: bool = Field(True, description="Write loss.png (needs matplotlib).")

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("cpu", "cuda", "auto"):
            return text
        if text.startswith("cuda:") and text[5:].isdigit():
            return text
        raise ValueError(f"must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {value!r}")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (value in ("", ".", "..") or "/" in value or "\\" in value):
            raise ValueError(f"must be a plain folder name without slashes; got {value!r}")
        return value

    def build_combination(self) -> Combination:
        """Build the configured combination module."""
        return self.combination.build()


def format_validation_error(
    exc: ValidationError, prefix: str = "", known_fields: Sequence[str] = ()
) -> str:
    """Pydantic errors as ``field.path: message (got value)``, joined by ``; `` on one line.

    An unknown top-level field is followed by ``known_fields`` when given.
    """
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        got = ""
        if err["type"] != "missing" and "input" in err and repr(err["input"]) not in msg:
            got = f" (got {err['input']!r})"
        known = ""
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            if known_fields and len(err["loc"]) == 1:
                known = "; known fields: " + ", ".join(known_fields)
        parts.append(f"{loc or 'config'}: {msg}{got}{known}")
    return "; ".join(parts)


# ---- config files and overrides -----------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping (JSON is YAML, so one parser reads both).

    Raises
    ------
    ConfigError
        If the file is missing, does not parse, or does not hold a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML or JSON{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of settings; got {type(data).__name__}"
        )
    return data


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar or list (``3``, ``1e-3``, ``true``, ``null``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return value


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied in order.

    Keys are dotted paths (``combination.pred_scale=10``). Setting ``combination.name``
    to another combination starts that combination from its defaults, so
    ``combination.name=mean`` does not carry over the parameters of ``max``.

    Raises
    ------
    ConfigError
        If an override has no ``=``, an empty key, or walks into a value that is not a
        mapping.
    """
    out: dict[str, Any] = json.loads(json.dumps(dict(data), default=str))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form key=value "
                "(for example epochs=3 or combination.pred_scale=10)"
            )
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is not a section with fields")
            node = child
        value = parse_value(raw)
        if parts == ["combination", "name"] and node.get("name") != value:
            node.clear()
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (if given), apply ``overrides`` and validate.

    Raises
    ------
    ConfigError
        With one line naming the offending field.
    """
    data = read_config_file(path) if path is not None else {}
    if "combination" not in data:
        data["combination"] = TrainConfig().combination.model_dump(mode="json")
    data = apply_overrides(data, overrides)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        known = list(TrainConfig.model_fields)
        raise ConfigError(format_validation_error(exc, known_fields=known)) from None
    return config


# ---- metrics ------------------------------------------------------------------------


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error."""
    return float(((pred.double() - target.double()) ** 2).mean().sqrt())


def pearson(pred: Tensor, target: Tensor) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x = pred.double() - pred.double().mean()
    y = target.double() - target.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


def _ranks(values: Tensor) -> Tensor:
    """Ranks starting at 0, ties sharing their average rank."""
    v = values.double().cpu()
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    return (sums / counts)[inverse]


def spearman(pred: Tensor, target: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(pred), _ranks(target))


# ---- training -----------------------------------------------------------------------


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
        Things the user should know (a plot that could not be drawn).
    """

    combination: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def _checked_combination(config: TrainConfig) -> Combination:
    """Build the combination, refusing a strategy it does not support."""
    combination = config.build_combination()
    if config.strategy == "stream" and not isinstance(combination, StreamingCombination):
        raise ConfigError(
            f"strategy: 'stream' needs a streaming combination and {combination.name!r} "
            "does not implement stream_terms; use strategy=store or strategy=recompute"
        )
    return combination


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {spec!r} asked for, but CUDA is not available in this torch "
                "build or machine; use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {spec!r} asked for, but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    return device


def _network(features: int, hidden: int, output_bias: float) -> torch.nn.Module:
    """Build the single-pose model: an MLP from a pose's features to one value."""
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        head.bias.fill_(output_bias)  # start at the mean target, not at 0 kcal/mol
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.SiLU(),
        head,
        torch.nn.Flatten(0),
    )


def _predict(model: MultiPoseModel, compounds: Sequence[Compound]) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        pred = torch.stack([model(list(c.poses))[0] for c in compounds])
    target = torch.stack([c.target for c in compounds])
    return pred.detach().cpu(), target.detach().cpu()


def _peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None, "unavailable on this platform"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
    return peak / scale, "process peak RSS"


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    write: bool = True,
    run_dir: Path | None = None,
    stream: TextIO | None = None,
) -> RunResult:
    """Train on the built-in dataset and report held-out metrics.

    Parameters
    ----------
    config
        The validated configuration.
    progress
        Show a tqdm progress bar on ``stream``.
    write
        Write the run folder (``config.yaml``, ``metrics.json``, ``loss.png``).
    run_dir
        Folder to write to; default ``config.output_dir / (config.name or a timestamp)``.
    stream
        Where the progress bar goes; default ``sys.stderr``.

    Returns
    -------
    RunResult
        Resolved combination, metrics and the run folder.

    Raises
    ------
    ConfigError
        If the device is unavailable or the strategy does not fit the combination.
    TrainingDivergedError
        If the loss stops being finite (the learning rate is too high).
    """
    combination = _checked_combination(config)
    device = _resolve_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        data = make_dataset(
            n_compounds=config.compounds,
            poses_per_compound=config.poses_per_compound,
            features=config.features,
            pose_spread=config.pose_spread,
            noise=config.noise,
            test_fraction=config.test_fraction,
            seed=config.seed,
            dtype=dtype,
        )
        train_set = [
            Compound(c.poses.to(device), c.target.to(device), c.pose_energies) for c in data.train
        ]
        test_set = [
            Compound(c.poses.to(device), c.target.to(device), c.pose_energies) for c in data.test
        ]
        mean_target = float(torch.stack([c.target for c in data.train]).mean())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = _network(config.features, config.hidden, mean_target)
        net = net.to(device=device, dtype=dtype)
        model = MultiPoseModel(net, combination, strategy=config.strategy)
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        steps = math.ceil(len(train_set) / config.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        history: list[dict[str, float]] = []
        epoch_times: list[float] = []
        n_train = len(train_set)
        shuffle = torch.Generator().manual_seed(config.seed + 1)
        bar = _progress_bar(
            config.epochs * steps,
            f"train {combination.name}",
            stream if stream is not None else sys.stderr,
            progress,
        )
        with bar:
            for epoch in range(1, config.epochs + 1):
                start = time.perf_counter()
                order = torch.randperm(n_train, generator=shuffle).tolist()
                total = 0.0
                for b in range(0, n_train, config.batch_size):
                    batch = order[b : b + config.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        for i in batch:
                            compound = train_set[i]
                            combined, _ = model(list(compound.poses))
                            loss = (combined - compound.target) ** 2
                            (loss / len(batch)).backward()
                            total += float(loss.detach())
                    except CombinationError as exc:  # non-finite per-pose predictions
                        raise _diverged(epoch, config.lr, str(exc).split(";")[0]) from None
                    if not math.isfinite(total):
                        raise _diverged(epoch, config.lr, f"the loss is {total}")
                    optimizer.step()
                    schedule.step()
                    bar.update(1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                epoch_times.append(time.perf_counter() - start)
                test_pred, test_target = _predict(model, test_set)
                history.append(
                    {
                        "epoch": epoch,
                        "train_rmse": math.sqrt(total / n_train),
                        "test_rmse": rmse(test_pred, test_target),
                    }
                )
                bar.set_postfix(
                    train_rmse=f"{history[-1]['train_rmse']:.3f}",
                    test_rmse=f"{history[-1]['test_rmse']:.3f}",
                )
        peak, peak_kind = _peak_memory_mb(device)
        test_pred, test_target = _predict(model, test_set)
        train_pred, train_target = _predict(model, train_set)
    finally:
        torch.set_num_threads(previous_threads)

    from combframe import __version__

    resolved = config.model_dump(mode="json")
    metrics: dict[str, Any] = {
        "combination": resolved["combination"],
        "strategy": config.strategy,
        "device": str(device),
        "test": {
            "rmse": rmse(test_pred, test_target),
            "pearson": pearson(test_pred, test_target),
            "spearman": spearman(test_pred, test_target),
            "compounds": len(test_set),
        },
        "train": {"rmse": rmse(train_pred, train_target), "compounds": n_train},
        "time_per_epoch_s": sum(epoch_times) / len(epoch_times),
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "history": history,
        "versions": {"combframe": __version__, "torch": torch.__version__},
    }
    result = RunResult(combination=resolved["combination"], metrics=metrics)
    if write:
        folder = run_dir if run_dir is not None else new_run_dir(config)
        write_run(folder, resolved, result)
    return result


def _diverged(epoch: int, lr: float, what: str) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"training diverged in epoch {epoch}: {what}; lower the learning rate (lr={lr:g})"
    )


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


def write_run(folder: Path, resolved: Mapping[str, Any], result: RunResult) -> None:
    """Write ``config.yaml``, ``metrics.json`` and (if possible) ``loss.png`` to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(dict(resolved), sort_keys=False))
    plot_note = None
    if resolved.get("plot", True):
        plot_note = _plot_history(folder / "loss.png", result)
    if plot_note is not None:
        result.notes.append(plot_note)
    result.metrics["files"] = [*sorted(p.name for p in folder.iterdir()), "metrics.json"]
    (folder / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    result.run_dir = folder


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
    """Return a tqdm progress bar when tqdm is installed (``combframe[progress]``)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
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
    ax.set_ylabel("RMSE of compound value (kcal/mol)")
    ax.set_title(f"combination: {result.combination['name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def compare(
    config: TrainConfig,
    names: Sequence[str],
    *,
    progress: bool = True,
    write: bool = True,
    stream: TextIO | None = None,
) -> tuple[list[RunResult], Path | None]:
    """Train once per combination name, everything else as in ``config``.

    A name equal to the configured combination's keeps the configured parameters; the
    others use their defaults. Runs go to subfolders of one run folder, next to a
    ``compare.json`` with the table.

    Raises
    ------
    ConfigError
        If ``names`` is empty or one of them is not installed.
    """
    cleaned = [n.strip() for n in names if n.strip()]
    if not cleaned:
        raise ConfigError("--compare: give at least one combination name, e.g. max,mean")
    configs = []
    for name in cleaned:
        try:
            comb = CombinationConfig(name=name)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix="--compare")) from None
        if comb.name == config.combination.name:
            comb = config.combination
        configs.append(config.model_copy(update={"combination": comb}))
        _checked_combination(configs[-1])  # refuse before the first run, not after it
    _resolve_device(config.device)
    top = new_run_dir(config) if write else None
    results = []
    for i, cfg in enumerate(configs):
        folder = None if top is None else top / f"{i + 1}-{cfg.combination.name}"
        results.append(train(cfg, progress=progress, write=write, run_dir=folder, stream=stream))
    if top is not None:
        table = [
            {"combination": r.combination, "test": r.metrics["test"], "run_dir": str(r.run_dir)}
            for r in results
        ]
        (top / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    return results, top
