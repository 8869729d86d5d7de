"""The registry of combinations, built from plugins through pluggy and entry points.

Plugins are found through the entry-point group ``combframe`` (the three shipped
combinations included) and through in-process registration (:func:`register_plugin`).
The registry is built on first use, from the environment at that moment, and cached
until :func:`reload_registry`. Reading entry-point metadata imports nothing; a plugin
module is imported only when the registry is built.

Environment variables, read when the registry is built:

``COMBFRAME_DISABLE_PLUGIN_AUTOLOAD``
    Non-empty (and not ``0``/``false``/``no``/``off``): load no entry points.
    Plugins registered in-process still work.
``COMBFRAME_BLOCK_PLUGINS``
    Comma-separated entry-point names that are not loaded (``max``, ``boltzmann``...).
``COMBFRAME_STRICT_PLUGINS``
    Non-empty (and not false-like): a plugin that fails to load or register raises
    :class:`~combframe.PluginValidationError` instead of warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import os
import re
import threading
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pluggy
import pydantic
from pydantic.fields import FieldInfo

from combframe.core.combination import Combination, CombinationParams, set_resolver
from combframe.errors import (
    CombinationError,
    PluginValidationError,
    PluginWarning,
    UnknownCombinationError,
)
from combframe.registry import hookspecs as _hookspecs

__all__ = [
    "CombinationInfo",
    "ENV_AUTOLOAD",
    "ENV_BLOCK",
    "ENV_STRICT",
    "ParameterInfo",
    "PluginLoadError",
    "Registry",
    "create_combination",
    "describe_combinations",
    "get_combination_class",
    "list_combinations",
    "normalize_name",
    "plugin_errors",
    "register_plugin",
    "reload_registry",
]

#: Entry-point group that plugins declare.
ENTRY_POINT_GROUP: Final = "combframe"
#: Disables entry-point autoload when set (like ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).
ENV_AUTOLOAD: Final = "COMBFRAME_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated entry-point names that are not loaded.
ENV_BLOCK: Final = "COMBFRAME_BLOCK_PLUGINS"
#: Makes plugin load failures raise instead of warn.
ENV_STRICT: Final = "COMBFRAME_STRICT_PLUGINS"

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.]*")
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})


def normalize_name(name: str) -> str:
    """Case-fold a combination name and treat ``-`` and ``_`` alike.

    >>> normalize_name(" Smooth-Max ")
    'smooth_max'
    """
    return name.strip().lower().replace("-", "_")


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _FALSE


# ---- what the registry reports ----------------------------------------------------------


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


@dataclass(frozen=True)
class PluginLoadError:
    """A plugin that failed to load or register and was skipped.

    Attributes
    ----------
    plugin
        The plugin's entry-point name.
    distribution
        The distribution that declares it, if known.
    version
        That distribution's version, if known.
    exception
        The error, as ``"ExceptionType: message"``.
    """

    plugin: str
    distribution: str | None
    version: str | None
    exception: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({_origin(self.distribution, self.version)}): " + (
            self.exception
        )


# ---- internals --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    plugin: str
    distribution: str | None
    version: str | None

    def describe(self) -> str:
        return f"plugin {self.plugin!r} ({_origin(self.distribution, self.version)})"


def _origin(distribution: str | None, version: str | None) -> str:
    if distribution is None:
        return "registered in-process"
    return f"distribution {distribution} {version}" if version else f"distribution {distribution}"


@dataclass(frozen=True)
class _Entry:
    cls: type[Combination]
    source: _Source
    name: str
    aliases: tuple[str, ...]
    deprecated: tuple[str, ...]


@dataclass(frozen=True)
class _Settings:
    autoload: bool
    blocked: frozenset[str]
    strict: bool


class _PluginFailureError(Exception):
    """Raised inside the build for a plugin that is at fault; isolated or re-raised."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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


def _names(cls: type, attr: str) -> tuple[str, ...]:
    raw = getattr(cls, attr, ())
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise _PluginFailureError(
            f"{_qualname(cls)}.{attr} must be a tuple of strings; got {raw!r}"
        )
    out = []
    for alias in raw:
        if not isinstance(alias, str) or not _NAME_RE.fullmatch(normalize_name(alias)):
            raise _PluginFailureError(
                f"{_qualname(cls)}.{attr} contains {alias!r}, which is not a valid "
                "combination name (letters, digits, '_', '-' and '.', starting with a "
                "letter or digit)"
            )
        out.append(normalize_name(alias))
    return tuple(dict.fromkeys(out))


def _validate_class(obj: object, source: _Source) -> _Entry:
    """Check one class a plugin returned; raise :class:`_PluginFailureError` if unusable."""
    if not (isinstance(obj, type) and issubclass(obj, Combination)):
        raise _PluginFailureError(
            f"combframe_add_combinations returned {obj!r}, which is not a subclass of "
            "combframe.Combination; return the combination classes themselves"
        )
    raw_name = obj.__dict__.get("name", getattr(obj, "name", None))
    if not isinstance(raw_name, str) or not raw_name.strip():
        raise _PluginFailureError(
            f"{_qualname(obj)} has no name (got {raw_name!r}); set a class attribute "
            "such as name = 'softmin'"
        )
    name = normalize_name(raw_name)
    if not _NAME_RE.fullmatch(name):
        raise _PluginFailureError(
            f"{_qualname(obj)}.name {raw_name!r} is not a valid combination name "
            "(letters, digits, '_', '-' and '.', starting with a letter or digit)"
        )
    params = getattr(obj, "Params", None)
    if not (isinstance(params, type) and issubclass(params, CombinationParams)):
        raise _PluginFailureError(
            f"{_qualname(obj)}.Params must be a subclass of combframe.CombinationParams; "
            f"got {params!r}"
        )
    if "name" in params.model_fields:
        raise _PluginFailureError(
            f"{_qualname(obj)}.Params declares a parameter called 'name', which is "
            "reserved for the combination name in configs; rename the parameter"
        )
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise _PluginFailureError(
            f"{_qualname(obj)} does not implement {missing}: a combination writes "
            "value(preds), h of one compound's predictions"
        )
    aliases = tuple(a for a in _names(obj, "aliases") if a != name)
    deprecated = tuple(a for a in _names(obj, "deprecated_aliases") if a != name)
    both = set(aliases) & set(deprecated)
    if both:
        raise _PluginFailureError(
            f"{_qualname(obj)} lists {sorted(both)} both as aliases and as deprecated aliases"
        )
    return _Entry(obj, source, name, aliases, deprecated)


class _Table:
    """One built registry: the plugin manager, the combinations and the load errors."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(_hookspecs)
        self.entries: dict[str, _Entry] = {}
        # normalized name or alias -> (canonical name, deprecated?)
        self.lookup: dict[str, tuple[str, bool]] = {}
        self.errors: list[PluginLoadError] = []
        self.schema_type: Any = None

    def _classes_of(self, plugin: object, source: _Source) -> list[_Entry]:
        impls = [
            impl
            for impl in self.pm.hook.combframe_add_combinations.get_hookimpls()
            if impl.plugin is plugin
        ]
        if not impls:
            raise _PluginFailureError(
                "it defines no combframe hook; decorate combframe_add_combinations "
                "with @combframe.hookimpl"
            )
        entries: list[_Entry] = []
        for impl in impls:
            returned = impl.function()
            if isinstance(returned, (str, bytes)) or not isinstance(returned, Iterable):
                raise _PluginFailureError(
                    f"combframe_add_combinations returned {returned!r}; expected a list "
                    "of combframe.Combination subclasses"
                )
            for obj in returned:
                entry = _validate_class(obj, source)
                if all(e.cls is not entry.cls for e in entries):
                    entries.append(entry)
        return entries

    def _stage(self, entries: list[_Entry]) -> tuple[dict[str, _Entry], dict[str, Any]]:
        """Return new entries and lookup keys, or raise on a clash; the table is untouched."""
        new_entries: dict[str, _Entry] = {}
        new_lookup: dict[str, tuple[str, bool]] = {}
        for entry in entries:
            existing = self.entries.get(entry.name)
            if existing is not None and existing.cls is entry.cls:
                continue  # the identical class, registered again: nothing to do
            keys = [(entry.name, False)]
            keys += [(a, False) for a in entry.aliases]
            keys += [(a, True) for a in entry.deprecated]
            for key, deprecated in keys:
                owner_name = (self.lookup.get(key) or new_lookup.get(key) or (None,))[0]
                if owner_name is not None:
                    owner = self.entries.get(owner_name) or new_entries[owner_name]
                    raise PluginValidationError(
                        entry.cls,
                        f"combination name {key!r} is claimed twice: "
                        f"{owner.source.describe()} registers {_qualname(owner.cls)} and "
                        f"{entry.source.describe()} registers {_qualname(entry.cls)}. "
                        "Uninstall one of them, or block one with "
                        f"{ENV_BLOCK}={entry.source.plugin}.",
                    )
                new_lookup[key] = (entry.name, deprecated)
            new_entries[entry.name] = entry
        return new_entries, new_lookup

    def add_plugin(self, plugin: object, source: _Source, *, strict: bool) -> None:
        """Register ``plugin``; isolate (or, when ``strict``, raise) its own failures.

        A name clash with another plugin always raises: it is not one plugin's fault, and
        keeping whichever came first would be a silent choice.
        """
        if self.pm.is_registered(plugin):
            return
        pm_name = source.plugin
        if self.pm.has_plugin(pm_name):
            pm_name = f"{source.plugin}[{source.distribution}]"
        try:
            try:
                self.pm.register(plugin, name=pm_name)
                self.pm.check_pending()
                entries = self._classes_of(plugin, source)
            except (_PluginFailureError, pluggy.PluginValidationError):
                raise
            except Exception as exc:
                raise _PluginFailureError(f"{type(exc).__name__}: {exc}") from exc
            new_entries, new_lookup = self._stage(entries)
        except _PluginFailureError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(plugin, source, str(exc), strict, exc.__cause__ or exc)
            return
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(plugin, source, f"invalid hook implementation: {exc}", strict, exc)
            return
        except BaseException:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise
        self.entries.update(new_entries)
        self.lookup.update(new_lookup)
        self.schema_type = None

    def _fail(
        self, plugin: object, source: _Source, text: str, strict: bool, cause: BaseException
    ) -> None:
        message = f"{source.describe()} failed to load and was skipped: {text}"
        if strict:
            raise PluginValidationError(plugin, message) from cause
        self.errors.append(
            PluginLoadError(source.plugin, source.distribution, source.version, text)
        )
        warnings.warn(
            f"{message}. Set {ENV_BLOCK}={source.plugin} to skip it quietly, or "
            f"{ENV_STRICT}=1 to make this an error.",
            PluginWarning,
            stacklevel=2,
        )

    def fail_import(self, source: _Source, exc: BaseException, strict: bool) -> None:
        self._fail(source.plugin, source, f"{type(exc).__name__}: {exc}", strict, exc)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str, str | None]] = set()
    out = []
    for ep in sorted(eps, key=lambda e: (e.name, e.value)):
        dist = _dist_of(ep)
        key = (ep.name, ep.value, dist[0])
        if key in seen:  # one distribution found twice on sys.path
            continue
        seen.add(key)
        out.append(ep)
    return out


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    name = dist.metadata["Name"]
    return (str(name) if name else None), dist.version


class Registry:
    """A registry of combinations: entry-point plugins plus in-process registrations.

    There is one current registry (:func:`current_registry`); the module functions
    (:func:`list_combinations`, :func:`create_combination`, ...) act on it, and
    :func:`combframe.testing.isolated_registry` swaps in a fresh one.

    Parameters
    ----------
    autoload, blocked, strict
        Override ``COMBFRAME_DISABLE_PLUGIN_AUTOLOAD`` (``autoload=False`` disables),
        ``COMBFRAME_BLOCK_PLUGINS`` and ``COMBFRAME_STRICT_PLUGINS``; ``None`` reads the
        environment when the registry is built.
    """

    def __init__(
        self,
        *,
        autoload: bool | None = None,
        blocked: Iterable[str] | None = None,
        strict: bool | None = None,
    ) -> None:
        self._autoload = autoload
        self._blocked = None if blocked is None else frozenset(map(normalize_name, blocked))
        self._strict = strict
        # (what the caller passed, the plugin object registered, its name)
        self._in_process: list[tuple[object, object, str]] = []
        self._table: _Table | None = None
        self._lock = threading.RLock()
        # entry points being imported by a build: a plugin that uses the registry while
        # it is imported (subclassing 'max', say) re-enters the build, which then skips it
        self._importing: set[str] = set()

    def _settings(self) -> _Settings:
        autoload = (
            self._autoload
            if self._autoload is not None
            else not _flag(os.environ.get(ENV_AUTOLOAD))
        )
        if self._blocked is not None:
            blocked = self._blocked
        else:
            raw = os.environ.get(ENV_BLOCK, "")
            blocked = frozenset(normalize_name(n) for n in raw.split(",") if n.strip())
        strict = self._strict if self._strict is not None else _flag(os.environ.get(ENV_STRICT))
        return _Settings(autoload, blocked, strict)

    def _build(self) -> _Table:
        settings = self._settings()
        table = _Table()
        if settings.autoload:
            for ep in _entry_points():
                if normalize_name(ep.name) in settings.blocked:
                    continue
                if ep.name in self._importing:
                    continue  # its own import asked for the registry: not ready yet
                dist, version = _dist_of(ep)
                source = _Source(ep.name, dist, version)
                self._importing.add(ep.name)
                try:
                    plugin = _as_plugin(ep.load())
                except Exception as exc:
                    table.fail_import(source, exc, settings.strict)
                    continue
                finally:
                    self._importing.discard(ep.name)
                table.add_plugin(plugin, source, strict=settings.strict)
        for _, plugin, name in self._in_process:
            table.add_plugin(plugin, _Source(name, None, None), strict=True)
        return table

    def table(self) -> _Table:
        """Return the built registry (building it now if needed)."""
        with self._lock:
            if self._table is None:
                self._table = self._build()
            return self._table

    def invalidate(self) -> None:
        """Forget the built registry; the next use rebuilds it (in-process plugins stay)."""
        with self._lock:
            self._table = None

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object in-process; see :func:`register_plugin`."""
        obj = _as_plugin(plugin)
        if name is None:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            if isinstance(plugin, type) and issubclass(plugin, Combination):
                name = getattr(plugin, "name", name)
        name = str(name)
        with self._lock:
            for given, _, known in self._in_process:
                if given is plugin:
                    return known
            if any(n == name for _, _, n in self._in_process):
                raise PluginValidationError(
                    obj, f"a plugin named {name!r} is already registered in-process; pass name="
                )
            # build (if needed) and apply now, so that errors surface at this call
            self.table().add_plugin(obj, _Source(name, None, None), strict=True)
            self._in_process.append((plugin, obj, name))
            return name

    # ---- queries ------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        if not isinstance(name, str):
            raise TypeError(f"a combination name must be a string; got {name!r}")
        table = self.table()
        key = normalize_name(name)
        found = table.lookup.get(key)
        if found is None:
            candidates = {k: v[0] for k, v in table.lookup.items()}
            close = difflib.get_close_matches(key, list(candidates), n=1)
            raise UnknownCombinationError(
                name,
                sorted(table.entries),
                candidates[close[0]] if close else None,
                failed=tuple(e.plugin for e in table.errors),
            )
        canonical, deprecated = found
        if deprecated:
            warnings.warn(
                f"combination name {name!r} is deprecated; use {canonical!r} instead",
                FutureWarning,
                stacklevel=4,
            )
        return table.entries[canonical]

    def resolve(self, name: str) -> tuple[str, type[Combination]]:
        """Canonical name and class for ``name`` or an alias (a deprecated alias warns)."""
        entry = self._entry(name)
        return entry.name, entry.cls

    def get(self, name: str) -> type[Combination]:
        """Return the class registered under ``name`` or one of its aliases."""
        return self._entry(name).cls

    def names(self) -> list[str]:
        """Sorted canonical names."""
        return sorted(self.table().entries)

    def describe(self) -> list[CombinationInfo]:
        """One :class:`CombinationInfo` per combination, sorted by name."""
        table = self.table()
        return [_info(table.entries[n]) for n in sorted(table.entries)]

    def errors(self) -> list[PluginLoadError]:
        """Plugins that failed to load or register in the current build."""
        return list(self.table().errors)


def _info(entry: _Entry) -> CombinationInfo:
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


def _as_plugin(plugin: object) -> object:
    """Return ``plugin`` as pluggy sees it: an object with the combframe hook.

    A combination class becomes a plugin that contributes just that class (entry points
    may name the class, ``max = "combframe_max:MaxCombination"``). A module without the
    hook contributes the concrete combination classes it defines.
    """
    if isinstance(plugin, type) and issubclass(plugin, Combination):
        return _ClassesPlugin(getattr(plugin, "name", plugin.__name__), [plugin])
    if isinstance(plugin, types.ModuleType) and not hasattr(plugin, "combframe_add_combinations"):
        defined = [
            obj
            for obj in vars(plugin).values()
            if isinstance(obj, type)
            and issubclass(obj, Combination)
            and obj.__module__ == plugin.__name__
            and not inspect.isabstract(obj)
        ]
        if defined:
            return _ClassesPlugin(plugin.__name__, defined)
    return plugin


class _ClassesPlugin:
    """A plugin object that contributes the given combination classes."""

    def __init__(self, name: str, classes: list[type[Combination]]) -> None:
        self.__name__ = name
        self.classes = classes

    @_hookspecs.hookimpl
    def combframe_add_combinations(self) -> list[type[Combination]]:
        """Return the classes."""
        return list(self.classes)


_CURRENT: Registry = Registry()


def current_registry() -> Registry:
    """Return the registry the module-level functions use."""
    return _CURRENT


def set_current_registry(registry: Registry) -> Registry:
    """Make ``registry`` current and return the previous one (used by the test helpers)."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, registry
    return previous


# ---- public functions ---------------------------------------------------------------


def list_combinations() -> list[str]:
    """Sorted canonical names of the installed combinations."""
    return _CURRENT.names()


def get_combination_class(name: str) -> type[Combination]:
    """Return the class registered under ``name`` (normalized; aliases accepted).

    For subclassing a registered combination; to build one, use
    :func:`create_combination`.

    Raises
    ------
    UnknownCombinationError
        If no installed combination has that name; the message lists the installed
        ones and the closest match.
    """
    return _CURRENT.get(name)


def create_combination(spec: Any, /, **params: Any) -> Combination:
    """Build a combination from a name, a ``{"name": ...}`` mapping, a config or itself.

    The one route from a description to a combination module: ``MultiPoseModel``,
    :class:`~combframe.CombinationConfig` and the command line all go through it.

    Parameters
    ----------
    spec
        A registered name or alias (``"max"``), a mapping with a ``"name"`` key and
        parameters, a pydantic model that dumps to one (a
        :class:`~combframe.CombinationConfig`), or a combination module (returned as is).
    **params
        Parameters, added to (and overriding) those in ``spec``.

    Raises
    ------
    UnknownCombinationError
        For an unknown name (the message lists the installed ones and the closest).
    pydantic.ValidationError
        For a bad or unknown parameter; the message names the field and the bound.
    CombinationError
        For a mapping without ``"name"``, or parameters given with a module.
    TypeError
        For anything else.

    Examples
    --------
    >>> import combframe
    >>> combframe.create_combination("max", pred_scale=100.0)
    MaxCombination(negate_preds=True, pred_scale=100.0)
    >>> combframe.create_combination({"name": "boltzmann", "kT": 0.6})
    BoltzmannCombination(kT=0.6)
    """
    if isinstance(spec, Combination):
        if params:
            raise CombinationError(
                f"parameters {sorted(params)} were given with the combination module "
                f"{spec!r}; set them on the module, or pass its name instead"
            )
        return spec
    if isinstance(spec, pydantic.BaseModel | Mapping):
        spec, params = _name_and_params(spec, params)
    if not isinstance(spec, str):
        raise TypeError(
            "a combination is given by a registered name, a {'name': ...} mapping, a "
            f"CombinationConfig or a combination module; got {type(spec).__name__}"
        )
    cls = _CURRENT.get(spec)
    # validate against Params first, so an unknown keyword is a pydantic error naming the
    # field even when the class's own __init__ spells out its parameters
    cls.Params.model_validate(params)
    return cls(**params)


def _name_and_params(spec: Any, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split a ``{"name": ..., **params}`` mapping (or a config) into name and parameters."""
    if isinstance(spec, pydantic.BaseModel):
        spec = spec.model_dump()
    if "name" not in spec:
        raise CombinationError(
            "a combination mapping needs a 'name' key, as in {'name': 'max', "
            f"'pred_scale': 100.0}}; got keys {sorted(map(str, spec))}"
        )
    return spec["name"], {**{k: v for k, v in spec.items() if k != "name"}, **params}


def describe_combinations() -> list[CombinationInfo]:
    """Describe every installed combination: origin, parameters, description, streaming."""
    return _CURRENT.describe()


def plugin_errors() -> list[PluginLoadError]:
    """Plugins that failed to load or register and were skipped (with a warning)."""
    return _CURRENT.errors()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin in-process, without an entry point.

    Parameters
    ----------
    plugin
        A module or object with ``@combframe.hookimpl`` hook implementations, or a
        :class:`~combframe.Combination` subclass (registered as a plugin that
        contributes just that class).
    name
        The plugin's name in listings and error messages; defaults to the module name
        (or the combination's name).

    Returns
    -------
    str
        The name the plugin was registered under.

    Raises
    ------
    PluginValidationError
        If the plugin is invalid, another in-process plugin already has ``name``, or one
        of its names clashes with an installed combination; nothing is registered then.

    Notes
    -----
    The registry is built (entry points loaded) if it was not yet, so that errors are
    raised here. Registering the same object again returns its name and does nothing.
    In-process plugins survive :func:`reload_registry` and are not affected by
    ``COMBFRAME_DISABLE_PLUGIN_AUTOLOAD`` or ``COMBFRAME_BLOCK_PLUGINS``.
    """
    return _CURRENT.register(plugin, name)


def reload_registry() -> None:
    """Rebuild the registry now: re-read the environment and the installed entry points.

    Plugins registered in-process are registered again. Useful in notebooks after
    installing a plugin, and in tests.
    """
    importlib.invalidate_caches()
    _CURRENT.invalidate()
    _CURRENT.table()


set_resolver(create_combination)
