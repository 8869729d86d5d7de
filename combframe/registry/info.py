"""The records the registry reports: combinations, their parameters, plugins that failed."""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass
from typing import Any

from pydantic.fields import FieldInfo

from combframe.core.combination import Combination

__all__ = ["CombinationInfo", "ParameterInfo", "PluginLoadError"]

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "multiple_of": "multiple of"}
_BOUNDS |= {"min_length": "length >=", "max_length": "length <="}


class _Origin:
    """Where a plugin comes from: mixed into the records with its name and distribution."""

    plugin: str
    distribution: str | None
    version: str | None

    @property
    def origin(self) -> str:
        """Where the plugin comes from (``distribution combframe 0.2.0``)."""
        if self.distribution is None:
            return "registered in-process"
        return " ".join(filter(None, ("distribution", self.distribution, self.version)))

    def _who(self) -> str:
        return f"plugin {self.plugin!r} ({self.origin})"

    def _block_key(self) -> str:
        # for an installed plugin its distribution too: a plain entry-point name would
        # also block another distribution's plugin of that name
        return self.plugin if self.distribution is None else f"{self.distribution}:{self.plugin}"


@dataclass(frozen=True)
class _Source(_Origin):
    plugin: str
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class PluginLoadError(_Origin):
    """A plugin that failed to load or register and was skipped.

    Attributes
    ----------
    plugin, distribution, version
        The plugin's entry-point name, and the distribution (and its version) that
        declares it, if known.
    exception
        The error, as ``"ExceptionType: message"``.
    """

    plugin: str
    distribution: str | None
    version: str | None
    exception: str

    def __str__(self) -> str:
        return f"{self._who()}: {self.exception}"


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
            for attr, op in _BOUNDS.items()
            if getattr(meta, attr, None) is not None
        ]
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        return cls(
            name, kind, default, ", ".join(bounds) or None, field.description or "", required
        )


@dataclass(frozen=True)
class CombinationInfo(_Origin):
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
