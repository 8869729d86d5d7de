"""The configuration of ``combframe train``: the model, files, overrides and help.

Importing this module loads neither torch nor the library: the ``combination`` field is
resolved to :class:`combframe.CombinationConfig` when a config is first validated, so
``combframe train --help`` can list every key without the cost of importing torch.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from combframe.errors import CombframeError

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import CoreSchema

    from combframe import CombinationConfig as _CombinationField
else:

    class _CombinationField:
        """Stands for :class:`combframe.CombinationConfig` until a config is validated."""

        @classmethod
        def __get_pydantic_core_schema__(
            cls, source: Any, handler: GetCoreSchemaHandler
        ) -> CoreSchema:
            import combframe

            return handler(combframe.CombinationConfig)


__all__ = [
    "ConfigError",
    "LossConfig",
    "MaskConfig",
    "ModelConfig",
    "PriorConfig",
    "ReaderConfig",
    "TrainConfig",
    "apply_overrides",
    "config_keys_help",
    "did_you_mean",
    "format_validation_error",
    "load_config",
    "parse_value",
    "read_config_file",
]


class ConfigError(CombframeError, ValueError):
    """A training configuration that cannot be used; the message names the field."""


def _default_combination() -> _CombinationField:
    import combframe

    return combframe.CombinationConfig(name="max", negate_preds=True)


class ModelConfig(BaseModel):
    """The single-pose network: a built-in one by name, or a class by import path.

    Extra keys are accepted only for a class named by import path, as its keyword
    arguments (:func:`combframe.app.models.build_network` checks them).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(
        "auto",
        description="auto (mlp for vectors, schnet for molecules), mlp, schnet, or "
        "package.module:Class (extra model.* keys are its keyword arguments).",
    )
    interactions: int = Field(3, ge=1, description="SchNet: interaction blocks.")
    cutoff: float = Field(5.0, gt=0, description="SchNet: interaction radius, Å.")
    gaussians: int = Field(25, ge=1, description="SchNet: radial basis functions.")


class ReaderConfig(BaseModel):
    """How molecular input is read (docs/data.md).

    The JSON of vectors uses only ``target``, when it is a list (several targets).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | list[str] | None = Field(
        None,
        description="SD property (SDF) or column (SMILES CSV) holding the value; a list "
        "[a, b] trains several targets at once (SD properties, CSV or manifest columns, "
        "JSON value keys; docs/data.md).",
    )
    values: Path | None = Field(
        None,
        description="CSV of name,value rows giving the values (name plus the target "
        "columns with a list reader.target).",
    )
    group_by: str | None = Field(
        None,
        description="SD property grouping an SDF's records into compounds; null: the "
        "molecule name.",
    )
    protein: Path | None = Field(
        None, description="Protein PDB: each SDF pose keeps the pocket atoms near it."
    )
    pocket_cutoff: float = Field(6.0, gt=0, description="Pocket radius around the ligand, Å.")
    conformers: int = Field(8, ge=1, description="Conformers generated per SMILES.")
    conformer_seed: int = Field(0, ge=0, description="Seed of the conformer generator.")
    minimize: bool = Field(False, description="MMFF-minimise generated conformers.")
    hydrogens: bool = Field(False, description="Keep hydrogen atoms in the poses.")
    limit: int | None = Field(
        None, ge=2, description="Read only N compounds, spread evenly over the input."
    )
    skip_invalid: bool = Field(
        False, description="Leave out unusable records and compounds (counted) instead of stopping."
    )
    cache: bool = Field(True, description="Cache the read molecules on disk.")
    cache_dir: Path | None = Field(
        None, description="Cache folder; null: $XDG_CACHE_HOME/combframe or ~/.cache/combframe."
    )

    @field_validator("target")
    @classmethod
    def _target_names(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if not value or any(not isinstance(v, str) or not v.strip() for v in value):
                raise ValueError(f"a list of targets must hold non-empty names; got {value}")
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise ValueError(f"names the target(s) {repeated} twice; give each once")
        return value

    @property
    def targets(self) -> tuple[str, ...]:
        """The names of several targets (a list ``target``); ``()`` for one value."""
        return tuple(self.target) if isinstance(self.target, list) else ()


class LossConfig(BaseModel):
    """The training loss over several targets (docs/train-save-predict.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: list[float] | None = Field(
        None,
        description="Per-target weights of the squared error, one per reader.target "
        "name, each > 0; null: all 1.",
    )

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not (w > 0 and w < math.inf) for w in value)):
            raise ValueError(f"must be finite numbers > 0, one per target; got {value}")
        return value


class PriorConfig(BaseModel):
    """A per-pose prior weight read from a pose field (docs/data.md, "Priors and masks")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str | None = Field(
        None,
        description="Pose field giving each pose's prior (an SD property, mmff_energy of "
        "minimised conformers, a JSON pose property); null: no prior.",
    )
    kind: Literal["log_weight", "probability", "energy"] = Field(
        "log_weight",
        description="What the field holds: log_weight (used as is), probability (0 < p "
        "<= 1, log p), energy (kcal/mol: -(E - lowest E of the compound) / prior.kT).",
    )
    kT: float = Field(
        0.593, gt=0, description="kind=energy: temperature in the field's unit (298 K)."
    )

    @model_validator(mode="after")
    def _needs_field(self) -> PriorConfig:
        # a saved config.yaml holds every key, so only a value other than the default counts
        given = [
            k
            for k, f in type(self).model_fields.items()
            if k != "field" and getattr(self, k) != f.default
        ]
        if self.field is None and given:
            keys = ", ".join(f"prior.{k}" for k in given)
            raise ValueError(
                f"{keys} given without prior.field, so no prior is read; set prior.field="
                "<pose field> (e.g. prior.field=mmff_energy) or leave them out"
            )
        return self


class MaskConfig(BaseModel):
    """Which poses count, read from a pose field (docs/data.md, "Priors and masks")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str | None = Field(
        None, description="Pose field: 1 keeps the pose, 0 leaves it out; null: no mask."
    )


class TrainConfig(BaseModel):
    """Everything ``combframe train`` needs. Unknown keys are rejected.

    Every field has a description; ``combframe train --help`` lists them with their
    types and defaults (:func:`config_keys_help`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    combination: _CombinationField = Field(
        default_factory=_default_combination,
        description="The combination by registered name, with its parameters "
        "(combination.name=boltzmann combination.kT=0.6); see `combframe list`.",
    )
    strategy: Literal["store", "recompute", "stream", "auto"] = Field(
        "auto",
        description="How per-pose gradients are kept (see MultiPoseModel); auto chooses "
        "one at the first step, for a loss on the combined predictions.",
    )
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the strategy's class (strategy_options.check=false for "
        "recompute); see combframe.Store, Recompute, Stream, Auto.",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="Poses per pass of the network (MultiPoseModel's chunk_size; molecules "
        "are batched with PyG's Batch); null: 16 for molecules unless strategy=store, "
        "else 1.",
    )
    device: str = Field(
        "cpu",
        description="cpu, cuda, cuda:N or auto (CUDA when available); under "
        "torchrun, cuda and auto take cuda:LOCAL_RANK.",
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="Floating dtype.")
    epochs: int = Field(10, ge=1, description="Passes over the training compounds.")
    lr: float = Field(3e-3, gt=0, description="Initial Adam learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="Learning-rate schedule over all steps: cosine or linear decay to 0, "
        "or constant.",
    )
    batch_size: int = Field(8, ge=1, description="Compounds per optimizer step.")
    normalize_targets: bool = Field(
        False,
        description="Train the network on standardised values (the training values' mean "
        "and standard deviation are kept in the model and undone in its output).",
    )
    hidden: int = Field(
        32, ge=1, description="Width of the single-pose network (SchNet: hidden channels)."
    )
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(),
        description="The single-pose network (model.name=...).",
    )
    seed: int = Field(0, ge=0, description="Seed of the data, the initial weights and shuffling.")
    data: Path | None = Field(
        None,
        description="What to train on instead of the built-in synthetic set: a "
        "compounds file (JSON vectors, SDF, SMILES .smi/.csv, CSV manifest; "
        "docs/data.md) or a built-in real set: chembl, cmet, posebusters.",
    )
    reader: ReaderConfig = Field(
        default_factory=lambda: ReaderConfig(),
        description="How molecular input is read (reader.target=..., see docs/data.md).",
    )
    loss: LossConfig = Field(
        default_factory=lambda: LossConfig(),
        description="The loss over several targets (loss.weights=[1, 0.5]).",
    )
    prior: PriorConfig = Field(
        default_factory=lambda: PriorConfig(),
        description="A per-pose prior weight from a pose field (prior.field=..., "
        "prior.kind=...); see docs/data.md.",
    )
    mask: MaskConfig = Field(
        default_factory=lambda: MaskConfig(),
        description="Poses to leave out, from a pose field (mask.field=...).",
    )
    compounds: int = Field(240, ge=2, description="Built-in set: compounds (both splits).")
    poses_per_compound: int = Field(8, ge=1, description="Built-in set: poses of every compound.")
    features: int = Field(8, ge=1, description="Built-in set: features of a pose.")
    pose_spread: float = Field(1.0, ge=0, description="Built-in set: spread of the poses.")
    noise: float = Field(0.1, ge=0, description="Built-in set: label noise, kcal/mol.")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Share of compounds held out.")
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the training compounds set aside for validation (the best "
        "model, early stopping, --compare's choice); 0: none.",
    )
    patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many epochs without a lower validation RMSE "
        "(needs val_fraction > 0); null: train every epoch.",
    )
    threads: int | None = Field(
        1, ge=1, description="CPU threads for torch (null keeps torch's default)."
    )
    output_dir: Path = Field(Path("runs"), description="Where run folders are created.")
    name: str | None = Field(
        None, description="Run folder name (-2, -3, ... is appended if it exists)."
    )
    plot: bool = Field(True, description="Write loss.png (needs matplotlib).")
    tensorboard: bool = Field(
        False, description="Write a TensorBoard log to the run folder (needs tensorboard)."
    )
    memory: bool = Field(
        True,
        description="Measure peak tensor memory (CPU: the profiler over the steps "
        "memory_steps picks; CUDA: the allocator's peak over the run); false: do not.",
    )
    memory_steps: Literal["first", "sampled", "every"] = Field(
        "sampled",
        description="CPU steps the profiler covers: first; sampled (steps 1, 2, 4, 8, ...: "
        "about log2 of the steps); every (costly).",
    )

    @model_validator(mode="after")
    def _patience_needs_validation(self) -> TrainConfig:
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError(
                f"patience={self.patience} stops on the validation RMSE; set val_fraction "
                "(e.g. val_fraction=0.2) or leave patience null"
            )
        return self

    @model_validator(mode="after")
    def _weights_per_target(self) -> TrainConfig:
        weights, names = self.loss.weights, self.reader.targets
        if weights is not None and len(weights) != len(names):
            raise ValueError(
                f"loss.weights has {len(weights)} weight(s) but reader.target names "
                f"{len(names)} target(s) {list(names)}; give one weight per target"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("cpu", "cuda", "auto"):
            return text
        if text.startswith("cuda:") and text[5:].isdigit():
            return text
        raise ValueError(f"must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {value!r}")

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_case(cls, value: Any) -> Any:
        # as MultiPoseModel(strategy="Stream") does: names are not case-sensitive
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (value in ("", ".", "..") or "/" in value or "\\" in value):
            raise ValueError(f"must be a plain folder name without slashes; got {value!r}")
        return value


#: Keys that describe the built-in synthetic data set; ignored with ``data=PATH``.
SYNTHETIC_KEYS = ("compounds", "poses_per_compound", "features", "pose_spread", "noise")


def saved_config(config: TrainConfig) -> dict[str, Any]:
    """Return ``config`` as a run records it (``config.yaml``, ``model.json``, checkpoint).

    File paths (``data``, ``reader.values``, ``reader.protein``, ``reader.cache_dir``)
    are made absolute, so ``combframe predict RUN`` and a resumed run find them from any
    folder; with ``data=...`` the built-in set's :data:`SYNTHETIC_KEYS` are left out (they
    describe no data of the run).
    """
    resolved = config.model_dump(mode="json")
    if config.data is not None:
        for key in SYNTHETIC_KEYS:
            del resolved[key]
        if config.data.exists():  # a file, not a built-in set's name
            resolved["data"] = str(config.data.absolute())
    reader = resolved["reader"]
    for key in ("values", "protein", "cache_dir"):
        if reader[key] is not None:
            reader[key] = str(Path(reader[key]).absolute())
    return resolved


#: Defaults shown in ``--help`` where the default is computed.
_HELP_DEFAULTS = {
    "combination": "max, negate_preds=true",
    "name": "a timestamp",
    "model": "name=auto",
    "reader": "see docs/data.md",
    "loss": "weights=null",
    "strategy_options": "{}",
    "prior": "no prior",
    "mask": "no mask",
}


def _type_name(annotation: Any) -> str:
    """Name a field's type for ``--help``: ``int``, ``path or null``, ``a|b``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join([*names, "null"])
    if annotation in (
        _CombinationField,
        ModelConfig,
        ReaderConfig,
        LossConfig,
        PriorConfig,
        MaskConfig,
    ):
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: Sequence[Any]) -> list[str]:
    """Render pydantic's numeric constraints (``Ge(1)``) as ``>= 1``."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return [
        f"{symbol} {getattr(item, attr)}"
        for item in metadata
        for attr, symbol in ops.items()
        if getattr(item, attr, None) is not None
    ]


def _default_text(name: str, default: Any) -> str:
    if name in _HELP_DEFAULTS:
        return _HELP_DEFAULTS[name]
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def config_keys_help(width: int = 100) -> str:
    """List every key of :class:`TrainConfig` with its type, default and description.

    Laid out as argparse lays out options: ``key=TYPE`` on the left, the description and
    default wrapped to ``width`` columns on the right.
    """
    column = 26
    lines = ["config keys (KEY=VALUE overrides, or in a --config file):"]
    sections: dict[str, type[BaseModel]] = {
        "model": ModelConfig,
        "reader": ReaderConfig,
        "loss": LossConfig,
        "prior": PriorConfig,
        "mask": MaskConfig,
    }
    fields = [(name, info) for name, info in TrainConfig.model_fields.items()]
    fields += [
        (f"{section}.{name}", info)
        for section, model in sections.items()
        for name, info in model.model_fields.items()
    ]
    for name, info in fields:
        left = f"  {name}={_type_name(info.annotation)}"
        bounds = "".join(f"; {b}" for b in _bounds(info.metadata))
        text = f"{info.description or ''} (default: {_default_text(name, info.default)}{bounds})"
        wrapped = textwrap.wrap(text, width=max(width - column, 30))
        if len(left) + 2 > column:
            lines.append(left)
            left = ""
        lines.append(left.ljust(column) + wrapped[0])
        lines += [" " * column + more for more in wrapped[1:]]
    return "\n".join(lines)


def did_you_mean(word: str, known: Sequence[str]) -> str:
    """Return ``; did you mean 'x'?`` for the closest of ``known`` to ``word``, or ``""``."""
    import difflib

    by_case = {k.lower(): k for k in known}
    close = [by_case[word.lower()]] if word.lower() in by_case else []
    close = close or difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


#: The sections whose unknown keys are refused with the closest known key.
_SECTIONS: dict[str, type[BaseModel]] = {
    "reader": ReaderConfig,
    "loss": LossConfig,
    "prior": PriorConfig,
    "mask": MaskConfig,
}


def _parameter_names(data: Mapping[str, Any] | None) -> list[str]:
    """Return the parameters of the combination named in ``data`` (none if unknown)."""
    section = (data or {}).get("combination")
    name = section.get("name") if isinstance(section, dict) else None
    if not isinstance(name, str):
        return []
    import combframe
    from combframe.registry import normalize_name

    for info in combframe.describe_combinations():
        if normalize_name(name) in (info.name, *info.aliases):
            return [p.name for p in info.parameters]
    return []


def format_validation_error(
    exc: ValidationError,
    prefix: str = "",
    known_fields: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> str:
    """Pydantic errors as ``field.path: message (got value)``, joined by ``; `` on one line.

    An unknown top-level field is followed by the closest known field and
    ``known_fields`` when given; an unknown ``reader.*`` (``loss.*``) key by the closest
    key of that section;
    an unknown combination parameter by the closest parameter of the combination named
    in ``data``.
    """
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = str(err["msg"]).removeprefix("Value error, ")
        got = ""
        if err["type"] != "missing" and "input" in err and repr(err["input"]) not in msg:
            got = f" (got {err['input']!r})"
        known = ""
        if err["type"] == "missing" and err["loc"][-1:] == ("dim",):
            known = f": give {loc}=<values per pose> (a pooling combination's embedding size)"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            if known_fields and len(err["loc"]) == 1:
                hint = did_you_mean(str(err["loc"][0]), known_fields)
                known = f"{hint}; known fields: " + ", ".join(known_fields)
            elif str(err["loc"][0]) in _SECTIONS and len(err["loc"]) == 2:
                fields = _SECTIONS[str(err["loc"][0])].model_fields
                known = did_you_mean(str(err["loc"][1]), list(fields))
            elif err["loc"][:1] == ("combination",):
                msg = "not a parameter of this combination (see `combframe list`)"
                known = did_you_mean(str(err["loc"][-1]), _parameter_names(data))
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
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply to be a config") from None
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


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar or list (``3``, ``1e-3``, ``true``, ``null``)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return value


def _parse_overrides(overrides: Sequence[str]) -> dict[tuple[str, ...], Any]:
    """Split ``key=value`` overrides into dotted paths; refuse conflicting ones."""
    parsed: dict[tuple[str, ...], Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        path = tuple(part.strip() for part in key.split("."))
        if not sep or not all(path):
            raise ConfigError(
                f"override {item!r} is not of the form key=value "
                "(for example epochs=3 or combination.pred_scale=10)"
            )
        value = parse_value(raw)
        for other, other_value in parsed.items():
            shorter = min(len(path), len(other))
            if other[:shorter] != path[:shorter] or (other == path and other_value == value):
                continue
            a, b = ".".join(other), ".".join(path)
            what = f"{a} is given twice" if a == b else f"{a} and {b} overlap"
            raise ConfigError(f"overrides: {what}; give each key once")
        parsed[path] = value
    return parsed


def _same_name(a: Any, b: Any) -> bool:
    from combframe.registry import normalize_name

    def norm(x: Any) -> Any:
        return normalize_name(x) if isinstance(x, str) else x

    return bool(norm(a) == norm(b))


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied.

    Keys are dotted paths (``combination.pred_scale=10``). The result does not depend on
    the order of the overrides: a key may be given once. Setting ``combination.name``
    to another combination starts that combination from its defaults (the parameters in
    ``data`` are dropped, the ones among ``overrides`` kept), so ``combination.name=mean``
    does not carry over the parameters of ``max``.

    Raises
    ------
    ConfigError
        If an override has no ``=`` or an empty key, a key is given twice (or inside
        another given key), or a path walks into a value that is not a mapping.
    """
    out: dict[str, Any] = json.loads(json.dumps(dict(data), default=str))
    parsed = _parse_overrides(overrides)
    new_name = parsed.get(("combination", "name"))
    section = out.get("combination")
    renamed = new_name is not None and not (
        isinstance(section, dict) and _same_name(section.get("name"), new_name)
    )
    if renamed and isinstance(section, dict):
        section.clear()
    for path, value in parsed.items():
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(
                    f"override {'.'.join(path)}: {where} is not a section with fields"
                )
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (if given), apply ``overrides`` and validate.

    Raises
    ------
    ConfigError
        With one line naming the offending field.
    """
    data = _bare_name(read_config_file(path) if path is not None else {})
    if "combination" not in data:
        data["combination"] = {"name": "max", "negate_preds": True}
    data = _bare_name(apply_overrides(data, overrides))
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        known = list(TrainConfig.model_fields)
        raise ConfigError(format_validation_error(exc, known_fields=known, data=data)) from None


def _bare_name(data: dict[str, Any]) -> dict[str, Any]:
    """Read ``combination: mean`` as ``combination: {name: mean}``, as Python takes a name."""
    if isinstance(data.get("combination"), str):
        data["combination"] = {"name": data["combination"]}
    return data
