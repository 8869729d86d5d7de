"""The registry of combinations, built from plugins through pluggy and entry points."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import pluggy

from combframe import _hookspecs
from combframe._combination import BaseCombination
from combframe._errors import PluginValidationError, UnknownCombinationError

__all__ = ["create_combination", "get_combination_class", "list_combinations", "resolve_combination"]

_CLASSES: dict[str, type[BaseCombination]] | None = None


def normalize_name(name: str) -> str:
    """Case-fold a combination name and treat ``-`` and ``_`` alike."""
    return name.strip().lower().replace("-", "_")


def _build() -> dict[str, type[BaseCombination]]:
    pm = pluggy.PluginManager("combframe")
    pm.add_hookspecs(_hookspecs)
    pm.load_setuptools_entrypoints("combframe")
    classes: dict[str, type[BaseCombination]] = {}
    for plugin_classes in pm.hook.combframe_add_combinations():
        for cls in plugin_classes:
            key = normalize_name(cls.name)
            if key in classes and classes[key] is not cls:
                raise PluginValidationError(cls, f"two plugins register combination {key!r}")
            classes[key] = cls
    return classes


def _classes() -> dict[str, type[BaseCombination]]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build()
    return _CLASSES


def list_combinations() -> list[str]:
    """Sorted names of the installed combinations."""
    return sorted(_classes())


def get_combination_class(name: str) -> type[BaseCombination]:
    """Return the class registered under ``name``."""
    classes = _classes()
    key = normalize_name(name)
    if key not in classes:
        close = difflib.get_close_matches(key, list(classes), n=1)
        raise UnknownCombinationError(name, sorted(classes), close[0] if close else None)
    return classes[key]


def create_combination(name: str, **params: Any) -> BaseCombination:
    """Build the combination registered under ``name`` with ``params``."""
    return get_combination_class(name)(**params)


def resolve_combination(obj: Any) -> BaseCombination:
    """Turn a combination object, name, config or ``{"name": ...}`` mapping into a module."""
    if isinstance(obj, BaseCombination):
        return obj
    if isinstance(obj, str):
        return create_combination(obj)
    build = getattr(obj, "build", None)
    if callable(build):
        built = build()
        if isinstance(built, BaseCombination):
            return built
    if isinstance(obj, Mapping):
        params = dict(obj)
        name = params.pop("name")
        return create_combination(name, **params)
    raise TypeError(
        "combination must be a combination module, a registered name, a "
        f"CombinationConfig or a {{'name': ...}} mapping; got {type(obj).__name__}"
    )
