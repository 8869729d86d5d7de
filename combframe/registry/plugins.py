"""Loading plugins: one shape, each plugin validated and isolated.

A plugin is what an entry point of the group ``combframe`` names, or what
:func:`~combframe.register_plugin` is given: a :class:`~combframe.Combination` subclass,
or a module of them (the subclasses it defines, or those its ``__all__`` lists).
:class:`Table` is one built registry: the classes by name and alias, the names that two
installed plugins claim, and the plugins that failed (isolated, or raised when strict).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from combframe.core.combination import Combination, CombinationParams, normalize_name
from combframe.errors import InvalidPluginError, PluginWarning, user_stacklevel

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_BLOCK",
    "ENV_STRICT",
    "Entry",
    "PluginLoadError",
    "Source",
    "Table",
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
_NAME_RULE: Final = "letters, digits, '_', '-' and '.', starting with a letter or digit"


@dataclass(frozen=True)
class Source:
    """Where a plugin comes from: its name, and its distribution and version if any."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def origin(self) -> str:
        """Say where the plugin comes from (``distribution combframe 0.1.0``)."""
        if self.distribution is None:
            return "registered in-process"
        return " ".join(filter(None, ("distribution", self.distribution, self.version)))

    def describe(self) -> str:
        """Say which plugin this is, for messages."""
        return f"plugin {self.plugin!r} ({self.origin()})"

    def block_key(self) -> str:
        """Return the ``COMBFRAME_BLOCK_PLUGINS`` value that blocks this plugin alone.

        ``distribution:entry-point`` for an installed plugin (a plain entry-point name
        would also block another distribution's plugin of the same name), the plugin's
        name for one registered in-process.
        """
        return self.plugin if self.distribution is None else f"{self.distribution}:{self.plugin}"

    def blocked_by(self, blocked: frozenset[str]) -> bool:
        """Whether a normalized block list names this plugin, alone or by distribution."""
        name, dist = normalize_name(self.plugin), normalize_name(self.distribution or "")
        by_dist = {f"{dist}:{name}", f"{dist}:*"} if dist else set()
        return name in blocked or bool(by_dist & blocked)


@dataclass(frozen=True)
class PluginLoadError:
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

    @property
    def origin(self) -> str:
        """Where the plugin comes from, as :meth:`Source.origin` says it."""
        return Source(self.plugin, self.distribution, self.version).origin()

    def __str__(self) -> str:
        return f"{Source(self.plugin, self.distribution, self.version).describe()}: " + (
            self.exception
        )


@dataclass(frozen=True)
class Entry:
    """One registered combination class, its normalized names and its source."""

    cls: type[Combination]
    source: Source
    name: str
    aliases: tuple[str, ...]
    deprecated: tuple[str, ...]

    def claim(self) -> str:
        """Say who claims the names: the plugin and the class it registers."""
        return f"{self.source.describe()} registers {_qualname(self.cls)}"

    def names(self) -> list[tuple[str, bool]]:
        """Every name it answers to, each with whether it is deprecated."""
        plain = [(n, False) for n in (self.name, *self.aliases)]
        return plain + [(n, True) for n in self.deprecated]


class _RejectedError(Exception):
    """A plugin at fault: isolated (a warning) or, when strict, raised."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def classes_of(plugin: object) -> list[type[Combination]]:
    """Return the combination classes a plugin contributes (the one plugin shape).

    A :class:`~combframe.Combination` subclass contributes itself; a module contributes
    the subclasses its ``__all__`` lists or, without ``__all__``, those it defines
    (abstract bases without a ``name`` of their own are skipped).
    """
    if isinstance(plugin, type) and issubclass(plugin, Combination):
        return [plugin]
    if not isinstance(plugin, types.ModuleType):
        raise _RejectedError(
            f"{plugin!r} is not a subclass of combframe.Combination nor a module of them; "
            "an entry point names the combination class or the module that defines it"
        )
    listed = getattr(plugin, "__all__", None)
    names = list(vars(plugin) if listed is None else listed)
    found = [
        obj
        for obj in (getattr(plugin, n, None) for n in names)
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


def _names(cls: type, attr: str) -> tuple[str, ...]:
    raw = cls.__dict__.get(attr, ())  # a subclass does not inherit its parent's aliases
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise _RejectedError(f"{_qualname(cls)}.{attr} must be a tuple of strings; got {raw!r}")
    bad = [a for a in raw if not isinstance(a, str) or not _NAME_RE.fullmatch(normalize_name(a))]
    if bad:
        raise _RejectedError(
            f"{_qualname(cls)}.{attr} contains {bad[0]!r}, which is not a valid "
            f"combination name ({_NAME_RULE})"
        )
    return tuple(dict.fromkeys(map(normalize_name, raw)))


def _entry(cls: type[Combination], source: Source) -> Entry:
    """Check one class a plugin contributes; raise :class:`_RejectedError` if unusable."""
    raw = cls.__dict__.get("name", getattr(cls, "name", None))
    if not isinstance(raw, str) or not raw.strip():
        raise _RejectedError(
            f"{_qualname(cls)} has no name (got {raw!r}); set a class attribute such as "
            "name = 'softmin'"
        )
    name = normalize_name(raw)
    if not _NAME_RE.fullmatch(name):
        raise _RejectedError(
            f"{_qualname(cls)}.name {raw!r} is not a valid combination name ({_NAME_RULE})"
        )
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, CombinationParams)):
        raise _RejectedError(
            f"{_qualname(cls)}.Params must be a subclass of combframe.CombinationParams; "
            f"got {params!r}"
        )
    if "name" in params.model_fields:
        raise _RejectedError(
            f"{_qualname(cls)}.Params declares a parameter called 'name', which is "
            "reserved for the combination name in configs; rename the parameter"
        )
    if inspect.isabstract(cls):
        raise _RejectedError(
            f"{_qualname(cls)} does not implement "
            + ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            + ": a combination writes value(preds), h of one compound's predictions"
        )
    aliases = tuple(a for a in _names(cls, "aliases") if a != name)
    deprecated = tuple(a for a in _names(cls, "deprecated_aliases") if a != name)
    if set(aliases) & set(deprecated):
        raise _RejectedError(
            f"{_qualname(cls)} lists {sorted(set(aliases) & set(deprecated))} both as "
            "aliases and as deprecated aliases"
        )
    return Entry(cls, source, name, aliases, deprecated)


class Table:
    """One built registry: the combinations by name, the ambiguous names, the failures."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        # normalized name or alias -> (its entry, deprecated?)
        self.lookup: dict[str, tuple[Entry, bool]] = {}
        self.errors: list[PluginLoadError] = []
        # name -> every entry that claims it (clashes between installed plugins)
        self.ambiguous: dict[str, list[Entry]] = {}
        self.schema_type: Any = None

    def add(self, plugin: object, source: Source, *, strict: bool) -> None:
        """Register ``plugin``; isolate (or, when ``strict``, raise) its own failures.

        A name that another plugin already claims is a clash. Between plugins loaded
        from entry points (and not ``strict``) it makes that name ambiguous: using it
        raises :class:`~combframe.errors.AmbiguousCombinationError` naming both sides,
        and every other name of both plugins keeps working. Registered in-process or
        when ``strict``, a clash raises and registers nothing: keeping whichever came
        first would be a silent choice.
        """
        try:
            entries = [_entry(cls, source) for cls in classes_of(plugin)]
        except _RejectedError as exc:
            self.fail(plugin, source, str(exc), strict, exc)
            return
        clashes: list[tuple[str, Entry, Entry]] = []
        lookup: dict[str, tuple[Entry, bool]] = {}
        for entry in entries:
            known = self.entries.get(entry.name)
            if known is not None and known.cls is entry.cls:
                continue  # the identical class, registered again: nothing to do
            for key, deprecated in entry.names():
                owner = self._owner(key) or lookup.get(key, (None,))[0]
                if owner is None:
                    lookup[key] = (entry, deprecated)
                elif source.distribution is not None and not strict and owner.source != source:
                    clashes.append((key, owner, entry))
                else:
                    raise InvalidPluginError(
                        entry.cls,
                        f"combination name {key!r} is claimed twice: {owner.claim()} and "
                        f"{entry.claim()}. Uninstall one of them, or block one with "
                        f"{ENV_BLOCK}={source.block_key()}.",
                    )
        self.lookup.update(lookup)
        self.entries.update((key, e) for key, (e, _) in lookup.items() if key == e.name)
        for key, owner, entry in clashes:
            self._make_ambiguous(key, owner, entry)
        self.schema_type = None

    def _owner(self, key: str) -> Entry | None:
        """Return the entry that already claims ``key`` (the first one if ambiguous)."""
        if key in self.ambiguous:
            return self.ambiguous[key][0]
        return self.lookup.get(key, (None,))[0]

    def _make_ambiguous(self, key: str, owner: Entry, entry: Entry) -> None:
        """Take ``key`` away from every claimant and record the clash (with a warning)."""
        claimants = self.ambiguous.setdefault(key, [owner])
        claimants.append(entry)
        self.lookup.pop(key, None)
        if self.entries.get(key) is owner:
            del self.entries[key]  # still reachable through its aliases, if it has any
        text = (
            f"combination name {key!r} is claimed twice: {owner.claim()} and "
            f"{entry.claim()}; the name is ambiguous and refused when used, while the "
            "other names of both plugins keep working"
        )
        self._record(entry.source, text)
        blocks = " or ".join(f"{ENV_BLOCK}={c.source.block_key()}" for c in claimants)
        warnings.warn(
            f"{text}. Uninstall one of them, or block one with {blocks}.",
            PluginWarning,
            stacklevel=user_stacklevel(),
        )

    def _record(self, source: Source, text: str) -> None:
        self.errors.append(
            PluginLoadError(source.plugin, source.distribution, source.version, text)
        )

    def fail(
        self, plugin: object, source: Source, text: str, strict: bool, cause: BaseException
    ) -> None:
        """Record a plugin that failed to load (with a warning), or raise when ``strict``."""
        message = f"{source.describe()} failed to load and was skipped: {text}"
        if strict:
            raise InvalidPluginError(plugin, message) from cause
        self._record(source, text)
        warnings.warn(
            f"{message}. Set {ENV_BLOCK}={source.plugin} to skip it quietly, or "
            f"{ENV_STRICT}=1 to make this an error.",
            PluginWarning,
            stacklevel=user_stacklevel(),
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
