"""The registry of combinations, built from entry points and in-process registrations.

A plugin is a :class:`~combframe.Combination` subclass or a module of them, named by an
entry point of the group ``combframe`` (the three shipped combinations included) or
given to :func:`register_plugin`. The registry is built on first use, from the
environment at that moment (:data:`ENV_AUTOLOAD`, :data:`ENV_BLOCK`, :data:`ENV_STRICT`),
and cached until :func:`reload_registry`; a plugin module is imported only then.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import pydantic

from combframe.core.combination import Combination, normalize_name, set_mtenn_call, set_resolver
from combframe.core.settings import checked_learn, validated
from combframe.errors import (
    AmbiguousCombinationError,
    CombinationError,
    InvalidPluginError,
    PluginWarning,
    UnknownCombinationError,
    user_stacklevel,
)
from combframe.mtenn.function import mtenn_call
from combframe.registry.plugins import (
    CombinationInfo,
    ParameterInfo,
    PluginLoadError,
    Source,
    _RejectedError,
    block_key,
    checked_info,
    claim,
    class_of,
    classes_of,
    dist_of,
    entry_points,
    qualname,
    who,
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

_P = ParamSpec("_P")
_R = TypeVar("_R")
_F = TypeVar("_F", bound=Callable[..., Any])

#: Disables entry-point autoload when set (like ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).
ENV_AUTOLOAD: Final = "COMBFRAME_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated entry points not to load, each ``name``, ``distribution:name`` or
#: ``distribution:*``.
ENV_BLOCK: Final = "COMBFRAME_BLOCK_PLUGINS"
#: Makes plugin load failures raise instead of warn.
ENV_STRICT: Final = "COMBFRAME_STRICT_PLUGINS"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class Table:
    """One built registry: every name with the combinations that claim it, and failures.

    A name claimed once is usable; one claimed by two installed plugins is ambiguous.
    """

    def __init__(self) -> None:
        self.claims: dict[str, list[CombinationInfo]] = {}
        self.errors: list[PluginLoadError] = []
        self.schema_type: Any = None  # the config's schema union, built on first use

    def add(self, plugin: object, source: Source, *, strict: bool) -> None:
        """Register ``plugin``, all of it or nothing; isolate (or raise) its own faults.

        A clash between entry points makes the name ambiguous, with a warning; registered
        in-process or when ``strict`` it raises :class:`~combframe.InvalidPluginError`.
        """
        new: dict[str, CombinationInfo] = {}
        clashes: list[tuple[str, CombinationInfo]] = []
        try:
            for info in [checked_info(cls, source) for cls in classes_of(plugin)]:
                for key in (info.name, *info.aliases, *info.deprecated_aliases):
                    # who claims it: an earlier plugin (the first, if several), or this one
                    owner = [*self.claims.get(key, ()), new.get(key)][0]
                    if owner is None:
                        new[key] = info
                    elif owner.combination_class is info.combination_class:
                        continue  # the identical class, registered again
                    elif key in new:
                        raise _RejectedError(
                            f"{qualname(class_of(owner))} and {qualname(class_of(info))} both "
                            f"claim the name {key!r}"
                        )
                    elif source.distribution is None or strict:
                        raise InvalidPluginError(
                            info.combination_class,
                            f"combination name {key!r} is claimed twice: {claim(owner)} and "
                            f"{claim(info)}. Uninstall one of them, or block one with "
                            f"{ENV_BLOCK}={block_key(source)}.",
                        )
                    else:
                        clashes.append((key, info))
        except _RejectedError as exc:
            self.fail(plugin, source, str(exc), strict, exc)
            return
        self.claims.update((key, [info]) for key, info in new.items())
        for key, info in clashes:
            claimants = self.claims[key]
            claimants.append(info)
            text = (
                f"combination name {key!r} is claimed twice: {claim(claimants[0])} and "
                f"{claim(info)}; the name is ambiguous and refused when used, while the "
                "other names of both plugins keep working"
            )
            blocks = " or ".join(f"{ENV_BLOCK}={block_key(c)}" for c in claimants)
            self._skip(source, text, f"{text}. Uninstall one of them, or block one with {blocks}.")
        self.schema_type = None

    def fail(
        self, plugin: object, source: Source, text: str, strict: bool, cause: BaseException
    ) -> None:
        """Record a plugin that failed to load (with a warning), or raise when ``strict``."""
        message = f"{who(source)} failed to load and was skipped: {text}"
        if strict:
            raise InvalidPluginError(plugin, message) from cause
        self._skip(
            source,
            text,
            f"{message}. Set {ENV_BLOCK}={source.plugin} to skip it quietly, or "
            f"{ENV_STRICT}=1 to make this an error.",
        )

    def _skip(self, source: Source, text: str, warning: str) -> None:
        self.errors.append(
            PluginLoadError(source.plugin, source.distribution, source.version, text)
        )
        warnings.warn(warning, PluginWarning, stacklevel=user_stacklevel())

    def infos(self) -> list[CombinationInfo]:
        """Return the usable combinations by name (one with an ambiguous name is left out)."""
        return [c[0] for key, c in sorted(self.claims.items()) if len(c) == 1 and c[0].name == key]

    def find(self, name: str) -> CombinationInfo:
        """Return the combination called ``name`` or an alias; a deprecated alias warns."""
        if not isinstance(name, str):
            raise TypeError(f"a combination name must be a string; got {name!r}")
        key = normalize_name(name)
        claims = self.claims.get(key, [])
        if len(claims) == 1:
            if key in claims[0].deprecated_aliases:
                warnings.warn(
                    f"combination name {name!r} is deprecated; use {claims[0].name!r} instead",
                    FutureWarning,
                    stacklevel=user_stacklevel(),
                )
            return claims[0]
        names = [info.name for info in self.infos()]
        if claims:
            claimants, block = [claim(c) for c in claims], [block_key(c) for c in claims]
            raise AmbiguousCombinationError(name, claimants, block, names)
        usable = {k: c[0].name for k, c in self.claims.items() if len(c) == 1}
        close = difflib.get_close_matches(key, list(usable), n=1)
        failed = tuple(e.plugin for e in self.errors)
        raise UnknownCombinationError(
            name, names, usable[close[0]] if close else None, failed=failed
        )


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
        self._autoload, self._strict = autoload, strict
        self._blocked = None if blocked is None else list(blocked)
        self._in_process: dict[str, object] = {}  # name -> plugin
        self._table: Table | None = None
        self._lock = threading.RLock()
        # entry points being imported by a build: a plugin that uses the registry while
        # it is imported (subclassing 'max', say) re-enters the build, which then skips it
        self._importing: set[str] = set()

    def _build(self) -> Table:
        autoload = not _flag(ENV_AUTOLOAD) if self._autoload is None else self._autoload
        strict = _flag(ENV_STRICT) if self._strict is None else self._strict
        given = os.environ.get(ENV_BLOCK, "").split(",") if self._blocked is None else self._blocked
        blocked = {normalize_name(n) for n in given if n.strip()}
        table = Table()
        for ep in entry_points() if autoload else ():
            source = Source(ep.name, *dist_of(ep))
            dist, name = normalize_name(source.distribution or ""), normalize_name(ep.name)
            by_dist = {f"{dist}:{name}", f"{dist}:*"} if dist else set()
            if name in blocked or by_dist & blocked or ep.name in self._importing:
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
        for name, plugin in self._in_process.items():
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

    def reload(self) -> None:
        """Rebuild the registry now: re-read the environment and the installed entry points.

        Plugins registered in-process are registered again. Useful in notebooks after
        installing a plugin, and in tests.
        """
        importlib.invalidate_caches()
        self.invalidate()
        self.table()

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin in-process, without an entry point.

        Parameters
        ----------
        plugin
            A :class:`~combframe.Combination` subclass, or a module of them: what an
            entry point may name.
        name
            The plugin's name in listings and error messages; defaults to the
            combination's name (or the module's).

        Returns
        -------
        str
            The name the plugin was registered under.

        Raises
        ------
        InvalidPluginError
            If the plugin is invalid, another in-process plugin already has ``name``, or
            one of its names clashes with an installed combination; nothing is
            registered then.

        Notes
        -----
        The registry is built (entry points loaded) if it was not yet, so that errors are
        raised here. Registering the same object again returns its name and does nothing.
        In-process plugins survive :func:`reload_registry` and are not affected by
        ``COMBFRAME_DISABLE_PLUGIN_AUTOLOAD`` or ``COMBFRAME_BLOCK_PLUGINS``.
        """
        if name is None:
            name = getattr(plugin, "name" if isinstance(plugin, type) else "__name__", None)
        name = str(name or getattr(plugin, "__name__", type(plugin).__name__))
        with self._lock:
            known = [n for n, p in self._in_process.items() if p is plugin]
            if known:
                return known[0]
            if name in self._in_process:
                raise InvalidPluginError(
                    plugin, f"a plugin named {name!r} is already registered in-process; pass name="
                )
            # build (if needed) and apply now, so that errors surface at this call
            self.table().add(plugin, Source(name), strict=True)
            self._in_process[name] = plugin
            return name

    def resolve(self, name: str) -> tuple[str, type[Combination]]:
        """Canonical name and class for ``name`` or an alias (a deprecated alias warns)."""
        info = self.table().find(name)
        return info.name, class_of(info)

    def get(self, name: str) -> type[Combination]:
        """Return the class registered under ``name`` (normalized; aliases accepted).

        For subclassing a registered combination; to build one, use
        :func:`create_combination`.

        Raises
        ------
        UnknownCombinationError
            If no installed combination has that name; the message lists the installed
            ones and the closest match.
        """
        return class_of(self.table().find(name))

    def names(self) -> list[str]:
        """Sorted canonical names of the installed combinations."""
        return [info.name for info in self.table().infos()]

    def describe(self) -> list[CombinationInfo]:
        """Describe every installed combination: origin, parameters, description, streaming."""
        return self.table().infos()

    def errors(self) -> list[PluginLoadError]:
        """Plugins that failed to load or register and were skipped (with a warning)."""
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


def _on_current(name: str, method: Callable[Concatenate[Registry, _P], _R]) -> Callable[_P, _R]:
    """Return the module function ``name``: ``method`` of the current registry."""

    def function(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(_CURRENT, *args, **kwargs)

    signature = inspect.signature(method)
    unbound = signature.replace(parameters=[*signature.parameters.values()][1:])
    function.__signature__ = unbound  # type: ignore[attr-defined]  # read by inspect.signature
    function.__name__ = function.__qualname__ = name
    function.__doc__ = method.__doc__
    function.__annotations__ = {k: v for k, v in method.__annotations__.items() if k != "self"}
    return function


list_combinations = _on_current("list_combinations", Registry.names)
get_combination_class = _on_current("get_combination_class", Registry.get)
describe_combinations = _on_current("describe_combinations", Registry.describe)
plugin_errors = _on_current("plugin_errors", Registry.errors)
register_plugin = _on_current("register_plugin", Registry.register)
reload_registry = _on_current("reload_registry", Registry.reload)


def create_combination(spec: Any, /, **params: Any) -> Combination:
    """Build a combination from a name, a ``{"name": ...}`` mapping, a config or itself.

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
        ``learn`` that names no learnable parameter (a ``TypeError`` for anything else).

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
    spec = spec.model_dump() if isinstance(spec, pydantic.BaseModel) else spec
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise CombinationError(
                "a combination mapping needs a 'name' key, as in {'name': 'max', "
                f"'pred_scale': 100.0}}; got keys {sorted(map(str, spec))}"
            )
        spec, params = spec["name"], {**{k: v for k, v in spec.items() if k != "name"}, **params}
    if not isinstance(spec, str):
        raise TypeError(
            "a combination is given by a registered name, a {'name': ...} mapping, a "
            f"CombinationConfig or a combination module; got {type(spec).__name__}"
        )
    _, cls, _, learn = _checked(spec, params)
    # built from the parameters as given: the class's own __init__ may spell them out
    return cls(**params, learn=learn) if learn else cls(**params)


def _checked(
    name: str, params: dict[str, Any]
) -> tuple[str, type[Combination], Any, tuple[str, ...]]:
    """Resolve ``name`` and validate ``params`` against its class (the one home of both).

    Returns the canonical name, the class, the validated ``Params`` and the learned
    parameters (``learn``, popped from ``params``). Raises as :func:`create_combination`
    says.
    """
    canonical, cls = _CURRENT.resolve(name)
    learn = params.pop("learn", None) or ()
    # Params first, so an unknown keyword is a pydantic error naming the field
    values = validated(cls.Params, params)
    return canonical, cls, values, checked_learn(canonical, cls.Params, learn)


def hookimpl(function: _F) -> _F:
    """Return ``function`` unchanged: the hook marker of 0.1's plugins (deprecated).

    A 0.1 plugin module that decorated ``combframe_add_combinations`` with it still
    imports; the registry takes the classes the module defines and ignores the hook.
    """
    return function


set_resolver(create_combination)
set_mtenn_call(mtenn_call)
