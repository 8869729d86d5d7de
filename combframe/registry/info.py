"""What the registry reports about installed combinations (for listings and the CLI)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
from dataclasses import dataclass
from typing import Any, Final

from pydantic.fields import FieldInfo

from combframe.core.combination import Combination
from combframe.registry.plugins import Entry, Source

__all__ = ["CombinationInfo", "ParameterInfo", "combination_info"]


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a combination, as its ``Params`` model declares it.

    Attributes
    ----------
    name
        Field name (the keyword of the combination and the key in a config).
    type
        The annotation, written as in source (``"float"``, ``"int | None"``).
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

    @classmethod
    def of(cls, name: str, field: FieldInfo) -> ParameterInfo:
        """Describe the pydantic field ``name``."""
        annotation = field.annotation
        kind = re.sub(r"\b(typing|typing_extensions|builtins)\.", "", repr(annotation))
        if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
            kind = annotation.__name__
        bounds = [
            f"{op} {getattr(meta, attr)}"
            for meta in field.metadata
            for attr, op in _BOUND_OPS
            if getattr(meta, attr, None) is not None
        ]
        required = field.is_required()
        return cls(
            name=name,
            type=kind,
            default=None if required else field.get_default(call_default_factory=True),
            bounds=", ".join(bounds) or None,
            description=field.description or "",
            required=required,
        )


_BOUND_OPS: Final = (
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("multiple_of", "multiple of"),
    ("min_length", "length >="),
    ("max_length", "length <="),
)


@dataclass(frozen=True)
class CombinationInfo:
    """What the registry knows about one installed combination.

    Attributes
    ----------
    name, aliases, deprecated_aliases
        The canonical name, the other accepted names, and the names still accepted with
        a :class:`FutureWarning`; all normalized.
    plugin, distribution, version
        The plugin that registered it (its entry-point name, or the name given to
        :func:`~combframe.register_plugin`), and the distribution that declares the entry
        point and its version (``None`` for an in-process plugin).
    description
        The first line of the class docstring.
    parameters
        The parameters, in ``Params`` field order.
    supports_stream
        Whether the class implements ``stream_terms`` and ``stream_coefficients`` (the
        ``"stream"`` strategy can run it).
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

    @property
    def origin(self) -> str:
        """Where its plugin comes from (``distribution combframe 0.2.0``)."""
        return Source(self.plugin, self.distribution, self.version).origin()


def combination_info(entry: Entry) -> CombinationInfo:
    """Describe one registered combination."""
    cls = entry.cls
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines()
    return CombinationInfo(
        name=entry.name,
        aliases=entry.aliases,
        plugin=entry.source.plugin,
        distribution=entry.source.distribution,
        version=entry.source.version,
        description=next((line.strip() for line in doc if line.strip()), ""),
        parameters=tuple(ParameterInfo.of(n, f) for n, f in cls.Params.model_fields.items()),
        supports_stream=all(
            callable(getattr(cls, m, None)) for m in ("stream_terms", "stream_coefficients")
        ),
        deprecated_aliases=entry.deprecated,
        combination_class=cls,
    )
