"""The registry of combinations, built from entry points and in-process registrations.

A plugin is a :class:`~combframe.Combination` subclass or a module of them, named by an
entry point of the group ``combframe`` (the three shipped combinations included) or
given to :func:`register_plugin`.
The registry is built on first use, from the environment at that moment
(:data:`ENV_AUTOLOAD`, :data:`ENV_BLOCK`, :data:`ENV_STRICT`), and cached until
:func:`reload_registry`. Reading entry-point metadata imports nothing; a plugin module
is imported only when the registry is built.
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import pydantic

from combframe.core.combination import Combination, set_mtenn_call, set_resolver
from combframe.core.settings import checked_learn, validated
from combframe.errors import (
    AmbiguousCombinationError,
    CombinationError,
    InvalidPluginError,
    UnknownCombinationError,
)
from combframe.mtenn.function import mtenn_call
from combframe.registry.info import CombinationInfo, ParameterInfo, combination_info
from combframe.registry.plugins import (
    ENV_BLOCK,
    ENV_STRICT,
    Entry,
    PluginLoadError,
    Source,
    Table,
    dist_of,
    entry_points,
    normalize_name,
)

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

#: Disables entry-point autoload when set (like ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).
ENV_AUTOLOAD: Final = "COMBFRAME_DISABLE_PLUGIN_AUTOLOAD"
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _FALSE


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
        # (the plugin, its name)
        self._in_process: list[tuple[object, str]] = []
        self._table: Table | None = None
        self._lock = threading.RLock()
        # entry points being imported by a build: a plugin that uses the registry while
        # it is imported (subclassing 'max', say) re-enters the build, which then skips it
        self._importing: set[str] = set()

    def _build(self) -> Table:
        env = os.environ
        autoload = not _flag(env.get(ENV_AUTOLOAD)) if self._autoload is None else self._autoload
        blocked = self._blocked
        if blocked is None:
            blocked = frozenset(
                normalize_name(n) for n in env.get(ENV_BLOCK, "").split(",") if n.strip()
            )
        strict = _flag(env.get(ENV_STRICT)) if self._strict is None else self._strict
        table = Table()
        for ep in entry_points() if autoload else ():
            source = Source(ep.name, *dist_of(ep))
            if source.blocked_by(blocked) or ep.name in self._importing:
                continue  # blocked, or its own import asked for the registry: not ready yet
            self._importing.add(ep.name)
            try:
                plugin = ep.load()
            except Exception as exc:
                table.fail(ep.name, source, f"{type(exc).__name__}: {exc}", strict, exc)
                continue
            finally:
                self._importing.discard(ep.name)
            table.add(plugin, source, strict=strict)
        for plugin, name in self._in_process:
            table.add(plugin, Source(name), strict=True)
        return table

    def table(self) -> Table:
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
        """Register a plugin in-process; see :func:`register_plugin`."""
        if name is None:
            name = getattr(plugin, "name" if isinstance(plugin, type) else "__name__", None)
        name = str(name or getattr(plugin, "__name__", type(plugin).__name__))
        with self._lock:
            for given, known in self._in_process:
                if given is plugin:
                    return known
            if any(n == name for _, n in self._in_process):
                raise InvalidPluginError(
                    plugin, f"a plugin named {name!r} is already registered in-process; pass name="
                )
            # build (if needed) and apply now, so that errors surface at this call
            self.table().add(plugin, Source(name), strict=True)
            self._in_process.append((plugin, name))
            return name

    # ---- queries ------------------------------------------------------------------------
    def _entry(self, name: str) -> Entry:
        if not isinstance(name, str):
            raise TypeError(f"a combination name must be a string; got {name!r}")
        table = self.table()
        key = normalize_name(name)
        if key in table.ambiguous:
            claimants = table.ambiguous[key]
            raise AmbiguousCombinationError(
                name,
                [e.claim() for e in claimants],
                [e.source.block_key() for e in claimants],
                sorted(table.entries),
            )
        found = table.lookup.get(key)
        if found is None:
            candidates = {k: v[0].name for k, v in table.lookup.items()}
            close = difflib.get_close_matches(key, list(candidates), n=1)
            raise UnknownCombinationError(
                name,
                sorted(table.entries),
                candidates[close[0]] if close else None,
                failed=tuple(e.plugin for e in table.errors),
            )
        entry, deprecated = found
        if deprecated:
            warnings.warn(
                f"combination name {name!r} is deprecated; use {entry.name!r} instead",
                FutureWarning,
                stacklevel=4,
            )
        return entry

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
        return [combination_info(table.entries[n]) for n in sorted(table.entries)]

    def errors(self) -> list[PluginLoadError]:
        """Plugins that failed to load or register in the current build."""
        return list(self.table().errors)


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
        Parameters, added to (and overriding) those in ``spec``; ``learn=[...]`` names
        the parameters to learn (see :attr:`Combination.learn`).

    Raises
    ------
    UnknownCombinationError
        For an unknown name (the message lists the installed ones and the closest).
    InvalidParametersError
        For a bad or unknown parameter; the message names the field and the bound. It
        is a :class:`CombinationError` and a ``pydantic.ValidationError``.
    CombinationError
        For a mapping without ``"name"``, parameters given with a module, or a
        ``learn`` that names no learnable parameter.
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
    learn = params.pop("learn", None)
    # validate against Params first, so an unknown keyword is a pydantic error naming the
    # field even when the class's own __init__ spells out its parameters
    validated(cls.Params, params)
    return (
        cls(**params, learn=checked_learn(cls.name, cls.Params, learn)) if learn else cls(**params)
    )


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
        A :class:`~combframe.Combination` subclass, or a module of them (the subclasses
        its ``__all__`` lists or, without ``__all__``, those it defines): what an entry
        point may name.
    name
        The plugin's name in listings and error messages; defaults to the combination's
        name (or the module's).

    Returns
    -------
    str
        The name the plugin was registered under.

    Raises
    ------
    InvalidPluginError
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


_F = TypeVar("_F", bound=Callable[..., Any])


def hookimpl(function: _F) -> _F:
    """Return ``function`` unchanged: the marker of the hook plugins of 0.1 (deprecated).

    A plugin module of 0.1 that decorated ``combframe_add_combinations`` with it still
    imports; the registry takes the combination classes the module defines, and ignores
    the hook.
    """
    return function


set_resolver(create_combination)
set_mtenn_call(mtenn_call)
