"""Loading plugins: entry points and in-process objects, validated and isolated.

A plugin is a combination class, a module defining combination classes, or an object
with the ``combframe_add_combinations`` hook (pluggy). :class:`Table` is one built
registry: pluggy's plugin manager, the validated classes by name, and the plugins that
failed (each failure isolated, or raised when strict).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pluggy

import combframe.registry.hookspecs as _hookspecs
from combframe.core.combination import Combination, CombinationParams, normalize_name
from combframe.errors import PluginValidationError, PluginWarning, user_stacklevel

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_BLOCK",
    "ENV_STRICT",
    "Entry",
    "Settings",
    "PluginLoadError",
    "Source",
    "Table",
    "as_plugin",
    "claim_of",
    "dist_of",
    "entry_points",
    "normalize_name",
]

#: Entry-point group that plugins declare.
ENTRY_POINT_GROUP: Final = "combframe"
#: Comma-separated entry points that are not loaded: ``name``, ``distribution:name`` or
#: ``distribution:*``.
ENV_BLOCK: Final = "COMBFRAME_BLOCK_PLUGINS"
#: Makes plugin load failures raise instead of warn.
ENV_STRICT: Final = "COMBFRAME_STRICT_PLUGINS"

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.]*")


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
class Source:
    """Where a plugin comes from: its name, and its distribution and version if any."""

    plugin: str
    distribution: str | None
    version: str | None

    def describe(self) -> str:
        """Say which plugin this is, for messages."""
        return f"plugin {self.plugin!r} ({_origin(self.distribution, self.version)})"

    def block_key(self) -> str:
        """Return the ``COMBFRAME_BLOCK_PLUGINS`` value that blocks this plugin alone.

        ``distribution:entry-point`` for an installed plugin (a plain entry-point name
        would also block another distribution's plugin of the same name), the plugin's
        name for one registered in-process.
        """
        if self.distribution is None:
            return self.plugin
        return f"{self.distribution}:{self.plugin}"

    def blocked_by(self, blocked: frozenset[str]) -> bool:
        """Whether a normalized block list names this plugin, alone or by distribution."""
        name = normalize_name(self.plugin)
        if name in blocked:
            return True
        if self.distribution is None:
            return False
        dist = normalize_name(self.distribution)
        return f"{dist}:{name}" in blocked or f"{dist}:*" in blocked


def _origin(distribution: str | None, version: str | None) -> str:
    if distribution is None:
        return "registered in-process"
    return f"distribution {distribution} {version}" if version else f"distribution {distribution}"


@dataclass(frozen=True)
class Entry:
    """One registered combination class, its names and its source."""

    cls: type[Combination]
    source: Source
    name: str
    aliases: tuple[str, ...]
    deprecated: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """The environment switches a build reads (autoload, blocked names, strict)."""

    autoload: bool
    blocked: frozenset[str]
    strict: bool


class _PluginFailureError(Exception):
    """Raised inside the build for a plugin that is at fault; isolated or re-raised."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def claim_of(entry: Entry) -> str:
    """Say who claims a name: the plugin and the class it registers."""
    return f"{entry.source.describe()} registers {_qualname(entry.cls)}"


def _names(cls: type, attr: str) -> tuple[str, ...]:
    raw = cls.__dict__.get(attr, ())  # a subclass does not inherit its parent's aliases
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


def _validate_class(obj: object, source: Source) -> Entry:
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
    return Entry(obj, source, name, aliases, deprecated)


class Table:
    """One built registry: the plugin manager, the combinations and the load errors."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(_hookspecs)
        self.entries: dict[str, Entry] = {}
        # normalized name or alias -> (its entry, deprecated?)
        self.lookup: dict[str, tuple[Entry, bool]] = {}
        self.errors: list[PluginLoadError] = []
        # name -> every entry that claims it (clashes between installed plugins)
        self.ambiguous: dict[str, list[Entry]] = {}
        self.schema_type: Any = None

    def _classes_of(self, plugin: object, source: Source) -> list[Entry]:
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
        entries: list[Entry] = []
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

    def _stage(
        self, entries: list[Entry], *, ambiguous_ok: bool
    ) -> tuple[dict[str, Entry], dict[str, tuple[Entry, bool]], list[tuple[str, Entry, Entry]]]:
        """Return new entries, lookup keys and clashes, or raise; the table is untouched.

        A key that another plugin already claims raises, or, with ``ambiguous_ok``, is
        returned as a clash ``(key, owner, newcomer)`` and left out of the new keys.
        """
        new_entries: dict[str, Entry] = {}
        new_lookup: dict[str, tuple[Entry, bool]] = {}
        clashes: list[tuple[str, Entry, Entry]] = []
        for entry in entries:
            existing = self.entries.get(entry.name)
            if existing is not None and existing.cls is entry.cls:
                continue  # the identical class, registered again: nothing to do
            keys = [(entry.name, False)]
            keys += [(a, False) for a in entry.aliases]
            keys += [(a, True) for a in entry.deprecated]
            for key, deprecated in keys:
                owner = self._owner(key) or new_lookup.get(key, (None,))[0]
                if owner is None:
                    new_lookup[key] = (entry, deprecated)
                elif ambiguous_ok and owner.source != entry.source:
                    clashes.append((key, owner, entry))
                else:
                    raise PluginValidationError(
                        entry.cls,
                        f"combination name {key!r} is claimed twice: "
                        f"{claim_of(owner)} and {claim_of(entry)}. Uninstall one of them, "
                        f"or block one with {ENV_BLOCK}={entry.source.block_key()}.",
                    )
            if not any(key == entry.name for key, _, new in clashes if new is entry):
                new_entries[entry.name] = entry
        return new_entries, new_lookup, clashes

    def _owner(self, key: str) -> Entry | None:
        """Return the entry that already claims ``key`` (the first one if ambiguous)."""
        if key in self.ambiguous:
            return self.ambiguous[key][0]
        return self.lookup.get(key, (None,))[0]

    def add_plugin(self, plugin: object, source: Source, *, strict: bool) -> None:
        """Register ``plugin``; isolate (or, when ``strict``, raise) its own failures.

        A name that an installed plugin already claims is a clash. For plugins loaded
        from entry points (and not ``strict``) it makes that name ambiguous: using it
        raises :class:`~combframe.errors.AmbiguousCombinationError` naming both sides,
        and every other name of both plugins keeps working. Registered in-process or
        when ``strict``, a clash raises and registers nothing: keeping whichever came
        first would be a silent choice.
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
            ambiguous_ok = source.distribution is not None and not strict
            new_entries, new_lookup, clashes = self._stage(entries, ambiguous_ok=ambiguous_ok)
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
        for key, owner, entry in clashes:
            self._make_ambiguous(key, owner, entry)
        self.schema_type = None

    def _make_ambiguous(self, key: str, owner: Entry, entry: Entry) -> None:
        """Take ``key`` away from every claimant and record the clash (with a warning)."""
        claimants = self.ambiguous.setdefault(key, [owner])
        claimants.append(entry)
        self.lookup.pop(key, None)
        if self.entries.get(key) is owner:
            del self.entries[key]  # still reachable through its aliases, if it has any
        text = (
            f"combination name {key!r} is claimed twice: {claim_of(owner)} and "
            f"{claim_of(entry)}; the name is ambiguous and refused when used, while the "
            "other names of both plugins keep working"
        )
        source = entry.source
        self.errors.append(
            PluginLoadError(source.plugin, source.distribution, source.version, text)
        )
        blocks = " or ".join(f"{ENV_BLOCK}={c.source.block_key()}" for c in claimants)
        warnings.warn(
            f"{text}. Uninstall one of them, or block one with {blocks}.",
            PluginWarning,
            stacklevel=user_stacklevel(),
        )

    def _fail(
        self, plugin: object, source: Source, text: str, strict: bool, cause: BaseException
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
            stacklevel=user_stacklevel(),
        )

    def fail_import(self, source: Source, exc: BaseException, strict: bool) -> None:
        """Record (or, when strict, raise) a plugin whose import failed."""
        self._fail(source.plugin, source, f"{type(exc).__name__}: {exc}", strict, exc)


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """Return the installed entry points of the ``combframe`` group, each once."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str, str | None]] = set()
    out = []
    for ep in sorted(eps, key=lambda e: (e.name, e.value)):
        dist = dist_of(ep)
        key = (ep.name, ep.value, dist[0])
        if key in seen:  # one distribution found twice on sys.path
            continue
        seen.add(key)
        out.append(ep)
    return out


def dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """Return the name and version of the distribution declaring ``ep``, if known."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    name = dist.metadata["Name"]
    return (str(name) if name else None), dist.version


def as_plugin(plugin: object) -> object:
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
