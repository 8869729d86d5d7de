"""Plugins: the one plugin shape, each class checked and described, names and clashes.

A plugin is a :class:`~combframe.Combination` subclass or a module of them. :class:`Table`
is one built registry: every name with the combinations that claim it, and the plugins
that failed; the rules it applies are the registry page's.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from pydantic.fields import FieldInfo

from combframe.core.combination import Combination, CombinationParams, normalize_name

#: Entry-point group that plugins declare.
ENTRY_POINT_GROUP: Final = "combframe"
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


def who(plugin: _Origin) -> str:
    """Say which plugin this is, for messages (``plugin 'max' (distribution ...)``)."""
    return f"plugin {plugin.plugin!r} ({plugin.origin})"


def block_key(plugin: _Origin) -> str:
    """Return the ``COMBFRAME_BLOCK_PLUGINS`` value that blocks this plugin alone.

    With its distribution when installed: a plain entry-point name would also block
    another distribution's plugin of that name.
    """
    return (
        plugin.plugin if plugin.distribution is None else f"{plugin.distribution}:{plugin.plugin}"
    )


@dataclass(frozen=True)
class Source(_Origin):
    """An installed plugin's entry-point name and distribution, or an in-process one's name."""

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
        return f"{who(self)}: {self.exception}"


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


_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.]*")
_NAME_RULE: Final = "letters, digits, '_', '-' and '.', starting with a letter or digit"


class _RejectedError(Exception):
    """A plugin at fault: isolated (a warning) or, when strict, raised."""


def qualname(cls: type) -> str:
    """Return ``module.Class``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def class_of(info: CombinationInfo) -> type[Combination]:
    """Return the class of a combination the registry described (:func:`checked_info` sets it)."""
    return cast("type[Combination]", info.combination_class)


def claim(info: CombinationInfo) -> str:
    """Say who claims a combination's names: its plugin and its class."""
    return f"{who(info)} registers {qualname(class_of(info))}"


def classes_of(plugin: object) -> list[type[Combination]]:
    """Return the combination classes a plugin contributes (abstract bases skipped)."""
    if isinstance(plugin, type) and issubclass(plugin, Combination):
        return [plugin]
    if not isinstance(plugin, types.ModuleType):
        raise _RejectedError(
            f"{plugin!r} is not a subclass of combframe.Combination nor a module of them; "
            "an entry point names the combination class or the module that defines it"
        )
    listed = getattr(plugin, "__all__", None)
    found = [
        obj
        for obj in (getattr(plugin, n, None) for n in (vars(plugin) if listed is None else listed))
        if isinstance(obj, type)
        and issubclass(obj, Combination)
        and (listed is not None or obj.__module__ == plugin.__name__)
        and (not inspect.isabstract(obj) or "name" in obj.__dict__)
    ]
    if not found:
        raise _RejectedError(
            f"module {plugin.__name__} defines no combframe.Combination subclass; an entry "
            "point names a combination class, or a module that defines (or lists in "
            "__all__) combination classes"
        )
    return list(dict.fromkeys(found))


def _names(cls: type, attr: str, raw: object) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise _RejectedError(f"{qualname(cls)}.{attr} must be a tuple of strings; got {raw!r}")
    for alias in raw:
        if not isinstance(alias, str) or not _NAME_RE.fullmatch(normalize_name(alias)):
            raise _RejectedError(
                f"{qualname(cls)}.{attr} contains {alias!r}, which is not a valid "
                f"combination name ({_NAME_RULE})"
            )
    return tuple(dict.fromkeys(map(normalize_name, raw)))


def checked_info(cls: type[Combination], source: Source) -> CombinationInfo:
    """Check one class a plugin contributes and describe it; raise if it is unusable."""
    raw = getattr(cls, "name", None)
    if not isinstance(raw, str) or not raw.strip():
        raise _RejectedError(
            f"{qualname(cls)} has no name (got {raw!r}); set a class attribute such as "
            "name = 'softmin'"
        )
    (name,) = _names(cls, "name", (raw,))
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, CombinationParams)):
        raise _RejectedError(
            f"{qualname(cls)}.Params must be a subclass of combframe.CombinationParams; "
            f"got {params!r}"
        )
    if "name" in params.model_fields:
        raise _RejectedError(
            f"{qualname(cls)}.Params declares a parameter called 'name', which is "
            "reserved for the combination name in configs; rename the parameter"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise _RejectedError(
            f"{qualname(cls)} does not implement {missing}: a combination writes "
            "value(preds), h of one compound's predictions"
        )
    # a subclass does not inherit its parent's aliases
    aliases, deprecated = (
        tuple(a for a in _names(cls, attr, cls.__dict__.get(attr, ())) if a != name)
        for attr in ("aliases", "deprecated_aliases")
    )
    if set(aliases) & set(deprecated):
        raise _RejectedError(
            f"{qualname(cls)} lists {sorted(set(aliases) & set(deprecated))} both as "
            "aliases and as deprecated aliases"
        )
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines()
    return CombinationInfo(
        name=name,
        aliases=aliases,
        plugin=source.plugin,
        distribution=source.distribution,
        version=source.version,
        description=next((line.strip() for line in doc if line.strip()), ""),
        parameters=tuple(ParameterInfo.of(n, f) for n, f in params.model_fields.items()),
        supports_stream=all(
            callable(getattr(cls, m, None)) for m in ("stream_terms", "stream_coefficients")
        ),
        deprecated_aliases=deprecated,
        combination_class=cls,
    )


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """Return the installed entry points of the ``combframe`` group, each once."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    unique = {(ep.name, ep.value, dist_of(ep)[0]): ep for ep in eps}  # a dist found twice
    return sorted(unique.values(), key=lambda e: (e.name, e.value))


def dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """Return the name and version of the distribution declaring ``ep``, if known."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    name = dist.metadata["Name"]
    return (str(name) if name else None), dist.version
