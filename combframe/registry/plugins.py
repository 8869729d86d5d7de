"""Plugins: the one plugin shape, each class checked, each plugin isolated, clashes kept apart.

A plugin is a :class:`~combframe.Combination` subclass or a module of them (the subclasses
its ``__all__`` lists or, without ``__all__``, those it defines). :class:`Table` is one
built registry: every name with the combinations that claim it, and the plugins that
failed. Its rules (what makes a class invalid, what a clash does) are the registry page's.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import re
import types
import warnings
from collections.abc import Sequence
from typing import Any, Final, cast

from combframe.core.combination import Combination, CombinationParams, normalize_name
from combframe.errors import (
    AmbiguousCombinationError,
    InvalidPluginError,
    PluginWarning,
    UnknownCombinationError,
    user_stacklevel,
)
from combframe.registry.info import CombinationInfo, ParameterInfo, PluginLoadError, _Source

__all__ = ["ENTRY_POINT_GROUP", "ENV_BLOCK", "ENV_STRICT", "Table", "dist_of", "entry_points"]

#: Entry-point group that plugins declare.
ENTRY_POINT_GROUP: Final = "combframe"
#: Comma-separated entry points that are not loaded: ``name``, ``distribution:name`` or
#: ``distribution:*``.
ENV_BLOCK: Final = "COMBFRAME_BLOCK_PLUGINS"
#: Makes plugin load failures raise instead of warn.
ENV_STRICT: Final = "COMBFRAME_STRICT_PLUGINS"

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.]*")
_NAME_RULE: Final = "letters, digits, '_', '-' and '.', starting with a letter or digit"


class _RejectedError(Exception):
    """A plugin at fault: isolated (a warning) or, when strict, raised."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class(info: CombinationInfo) -> type[Combination]:
    return cast("type[Combination]", info.combination_class)  # set by the registry's _info


def _claim(info: CombinationInfo) -> str:
    return f"{info._who()} registers {_qualname(_class(info))}"


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
        raise _RejectedError(f"{_qualname(cls)}.{attr} must be a tuple of strings; got {raw!r}")
    for alias in raw:
        if not isinstance(alias, str) or not _NAME_RE.fullmatch(normalize_name(alias)):
            raise _RejectedError(
                f"{_qualname(cls)}.{attr} contains {alias!r}, which is not a valid "
                f"combination name ({_NAME_RULE})"
            )
    return tuple(dict.fromkeys(map(normalize_name, raw)))


def _info(cls: type[Combination], source: _Source) -> CombinationInfo:
    """Check one class a plugin contributes and describe it; raise if it is unusable."""
    raw = getattr(cls, "name", None)
    if not isinstance(raw, str) or not raw.strip():
        raise _RejectedError(
            f"{_qualname(cls)} has no name (got {raw!r}); set a class attribute such as "
            "name = 'softmin'"
        )
    (name,) = _names(cls, "name", (raw,))
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
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise _RejectedError(
            f"{_qualname(cls)} does not implement {missing}: a combination writes "
            "value(preds), h of one compound's predictions"
        )
    # a subclass does not inherit its parent's aliases
    aliases, deprecated = (
        tuple(a for a in _names(cls, attr, cls.__dict__.get(attr, ())) if a != name)
        for attr in ("aliases", "deprecated_aliases")
    )
    if set(aliases) & set(deprecated):
        raise _RejectedError(
            f"{_qualname(cls)} lists {sorted(set(aliases) & set(deprecated))} both as "
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


class Table:
    """One built registry: every name with the combinations that claim it, and failures.

    A name claimed once is usable; a name that two installed plugins claim is ambiguous,
    refused when used while every other name keeps working.
    """

    def __init__(self) -> None:
        self.claims: dict[str, list[CombinationInfo]] = {}
        self.errors: list[PluginLoadError] = []
        self.schema_type: Any = None  # the config's schema union, built on first use

    def add(self, plugin: object, source: _Source, *, strict: bool) -> None:
        """Register ``plugin``, all of it or nothing; isolate (or raise) its own faults.

        A name that another plugin already claims is a clash: between entry points (not
        ``strict``) it makes the name ambiguous, with a warning; registered in-process or
        when ``strict`` it raises :class:`~combframe.InvalidPluginError`.
        """
        new: dict[str, CombinationInfo] = {}
        clashes: list[tuple[str, CombinationInfo]] = []
        try:
            for info in [_info(cls, source) for cls in classes_of(plugin)]:
                for key in (info.name, *info.aliases, *info.deprecated_aliases):
                    owner = [*self.claims.get(key, ()), new.get(key)][0]
                    if owner is None:
                        new[key] = info
                    elif owner.combination_class is info.combination_class:
                        continue  # the identical class, registered again
                    elif key in new:
                        raise _RejectedError(
                            f"{_qualname(_class(owner))} and {_qualname(_class(info))} both "
                            f"claim the name {key!r}"
                        )
                    elif source.distribution is None or strict:
                        raise InvalidPluginError(
                            info.combination_class,
                            f"combination name {key!r} is claimed twice: {_claim(owner)} and "
                            f"{_claim(info)}. Uninstall one of them, or block one with "
                            f"{ENV_BLOCK}={source._block_key()}.",
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
                f"combination name {key!r} is claimed twice: {_claim(claimants[0])} and "
                f"{_claim(info)}; the name is ambiguous and refused when used, while the "
                "other names of both plugins keep working"
            )
            blocks = " or ".join(f"{ENV_BLOCK}={c._block_key()}" for c in claimants)
            self._skip(source, text, f"{text}. Uninstall one of them, or block one with {blocks}.")
        self.schema_type = None

    def fail(
        self, plugin: object, source: _Source, text: str, strict: bool, cause: BaseException
    ) -> None:
        """Record a plugin that failed to load (with a warning), or raise when ``strict``."""
        message = f"{source._who()} failed to load and was skipped: {text}"
        if strict:
            raise InvalidPluginError(plugin, message) from cause
        self._skip(
            source,
            text,
            f"{message}. Set {ENV_BLOCK}={source.plugin} to skip it quietly, or "
            f"{ENV_STRICT}=1 to make this an error.",
        )

    def _skip(self, source: _Source, text: str, warning: str) -> None:
        self.errors.append(
            PluginLoadError(source.plugin, source.distribution, source.version, text)
        )
        warnings.warn(warning, PluginWarning, stacklevel=user_stacklevel())

    def infos(self) -> list[CombinationInfo]:
        """Return the usable combinations by name (one with an ambiguous name is left out)."""
        return [c[0] for key, c in sorted(self.claims.items()) if [key] == [i.name for i in c]]

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
            who, block = [_claim(c) for c in claims], [c._block_key() for c in claims]
            raise AmbiguousCombinationError(name, who, block, names)
        usable = {k: c[0].name for k, c in self.claims.items() if len(c) == 1}
        close = difflib.get_close_matches(key, list(usable), n=1)
        failed = tuple(e.plugin for e in self.errors)
        raise UnknownCombinationError(
            name, names, usable[close[0]] if close else None, failed=failed
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
