"""combframe: combine per-pose predictions with exact gradients, one pose graph at a time.

The public API is the names in ``__all__``; each is documented in the API reference.
They are loaded on first use, so ``import combframe`` alone imports neither torch nor
any plugin (the command line starts fast). Submodules: :mod:`combframe.segment`
(segment reductions for batched combinations), :mod:`combframe.errors`,
:mod:`combframe.registry` (plugins, names, configs), :mod:`combframe.mtenn` (mtenn's
Functions and configs) and :mod:`combframe.testing` (the gradient-parity harness and
plugin test helpers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from combframe.core.batch import CompoundPredictions, default_collate
    from combframe.core.combination import Combination, CombinationParams
    from combframe.core.model import MultiPoseModel
    from combframe.core.strategies import Recompute, Store, Stream
    from combframe.errors import CombinationError, StrategyError
    from combframe.registry import (
        create_combination,
        describe_combinations,
        list_combinations,
        register_plugin,
    )
    from combframe.registry.config import CombinationConfig
    from combframe.registry.hookspecs import hookimpl

__all__ = [
    "Combination",
    "CombinationConfig",
    "CombinationError",
    "CombinationParams",
    "CompoundPredictions",
    "MultiPoseModel",
    "Recompute",
    "Store",
    "StrategyError",
    "Stream",
    "create_combination",
    "default_collate",
    "describe_combinations",
    "hookimpl",
    "list_combinations",
    "register_plugin",
]

#: Where each public name lives.
_HOMES = {
    "Combination": "combframe.core.combination",
    "CombinationParams": "combframe.core.combination",
    "CompoundPredictions": "combframe.core.batch",
    "default_collate": "combframe.core.batch",
    "MultiPoseModel": "combframe.core.model",
    "Recompute": "combframe.core.strategies",
    "Store": "combframe.core.strategies",
    "Stream": "combframe.core.strategies",
    "CombinationError": "combframe.errors",
    "StrategyError": "combframe.errors",
    "CombinationConfig": "combframe.registry.config",
    "create_combination": "combframe.registry",
    "describe_combinations": "combframe.registry",
    "list_combinations": "combframe.registry",
    "register_plugin": "combframe.registry",
    "hookimpl": "combframe.registry.hookspecs",
}

#: Names of earlier releases, still importable from here; each lives in the module shown.
_EARLIER = {
    "BaseCombination": ("combframe.core.combination", "Combination"),
    "StreamingCombination": ("combframe.core.combination", "StreamingCombination"),
    "CombinationFunction": ("combframe.core.function", "CombinationFunction"),
    "ParamLayout": ("combframe.core.gradients", "ParamLayout"),
    "PoseGradients": ("combframe.core.gradients", "PoseGradients"),
    "Strategy": ("combframe.core.strategies", "Strategy"),
    "StrategyWarning": ("combframe.errors", "StrategyWarning"),
    "UnknownCombinationError": ("combframe.errors", "UnknownCombinationError"),
    "PluginValidationError": ("combframe.errors", "PluginValidationError"),
    "PluginWarning": ("combframe.errors", "PluginWarning"),
    "CombinationInfo": ("combframe.registry", "CombinationInfo"),
    "ParameterInfo": ("combframe.registry", "ParameterInfo"),
    "PluginLoadError": ("combframe.registry", "PluginLoadError"),
    "get_combination_class": ("combframe.registry", "get_combination_class"),
    "plugin_errors": ("combframe.registry", "plugin_errors"),
    "reload_registry": ("combframe.registry", "reload_registry"),
    "resolve_combination": ("combframe.registry", "create_combination"),
    "hookspec": ("combframe.registry.hookspecs", "hookspec"),
    "combination_config_schema": ("combframe.registry.config", "combination_config_schema"),
    "from_mtenn_config": ("combframe.mtenn", "from_mtenn_config"),
    "migrate_mtenn_config": ("combframe.mtenn", "migrate_mtenn_config"),
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("combframe")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            return "0+unknown"
    home, attr = (_HOMES[name], name) if name in _HOMES else _EARLIER.get(name, ("", ""))
    if not home:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module("combframe.registry")  # installs the name resolver of the core
    value = getattr(importlib.import_module(home), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, *_EARLIER])
