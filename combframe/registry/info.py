"""What the registry reports about installed combinations (for listings and the CLI)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from dataclasses import dataclass
from typing import Any, Final

from pydantic.fields import FieldInfo

from combframe.core.combination import Combination, CombinationParams
from combframe.registry.plugins import Entry

__all__ = ["CombinationInfo", "ParameterInfo", "combination_info"]


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a combination, as its ``Params`` model declares it.

    Attributes
    ----------
    name
        Field name (the keyword of the combination and the key in a config).
    type
        The annotation, written as in source (``"float"``, ``"bool"``, ``"int | None"``).
    default
        The default value (``None`` when ``required``).
    bounds
        Constraints such as ``"> 0"`` or ``">= 0, < 1"``; ``None`` when unbounded.
    description
        The field's description, or ``""``.
    required
        Whether the parameter has no default.
    """

    name: str
    type: str
    default: Any
    bounds: str | None
    description: str
    required: bool = False


@dataclass(frozen=True)
class CombinationInfo:
    """What the registry knows about one installed combination.

    Attributes
    ----------
    name
        The canonical (normalized) name.
    aliases
        Other accepted names, normalized.
    plugin
        The plugin that registered it: its entry-point name, or the name given to
        :func:`register_plugin`.
    distribution
        The distribution (package) that declares the entry point, if any.
    version
        That distribution's version, if any.
    description
        The first line of the class docstring.
    parameters
        The parameters, in ``Params`` field order.
    supports_stream
        Whether the class implements ``stream_terms`` and ``stream_coefficients`` (the
        ``"stream"`` strategy can run it).
    deprecated_aliases
        Names still accepted with a :class:`FutureWarning`.
    combination_class
        The class itself.
    """

    name: str
    aliases: tuple[str, ...]
    plugin: str
    distribution: str | None
    version: str | None
    description: str
    parameters: tuple[ParameterInfo, ...]
    supports_stream: bool
    deprecated_aliases: tuple[str, ...] = ()
    combination_class: type[Combination] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )


def _type_str(annotation: Any) -> str:
    if annotation is None:
        return "None"
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation.__name__
    return re.sub(r"\b(typing|typing_extensions|builtins)\.", "", repr(annotation))


_BOUND_OPS: Final = (
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("multiple_of", "multiple of"),
    ("min_length", "length >="),
    ("max_length", "length <="),
)


def _bounds(field: FieldInfo) -> str | None:
    parts: list[str] = []
    for meta in field.metadata:
        for attr, op in _BOUND_OPS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{op} {value}")
    return ", ".join(parts) or None


def _parameters(params: type[CombinationParams]) -> tuple[ParameterInfo, ...]:
    out = []
    for name, field in params.model_fields.items():
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        out.append(
            ParameterInfo(
                name=name,
                type=_type_str(field.annotation),
                default=default,
                bounds=_bounds(field),
                description=field.description or "",
                required=required,
            )
        )
    return tuple(out)


def _description(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    if not doc:
        return ""
    lines = [line for line in inspect.cleandoc(doc).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def _supports_stream(cls: type) -> bool:
    return callable(getattr(cls, "stream_terms", None)) and callable(
        getattr(cls, "stream_coefficients", None)
    )


def combination_info(entry: Entry) -> CombinationInfo:
    """Describe one registered combination."""
    return CombinationInfo(
        name=entry.name,
        aliases=entry.aliases,
        plugin=entry.source.plugin,
        distribution=entry.source.distribution,
        version=entry.source.version,
        description=_description(entry.cls),
        parameters=_parameters(entry.cls.Params),
        supports_stream=_supports_stream(entry.cls),
        deprecated_aliases=entry.deprecated,
        combination_class=entry.cls,
    )
