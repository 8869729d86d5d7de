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
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from combframe.core.batch import CompoundPredictions, default_collate
    from combframe.core.combination import Combination, CombinationParams, StreamingCombination
    from combframe.core.model import MultiPoseModel
    from combframe.core.strategies import Auto, Recompute, Store, Stream
    from combframe.core.weights import pose_weights
    from combframe.errors import (
        CombframeError,
        CombframeWarning,
        CombinationError,
        InvalidParametersError,
        InvalidPluginError,
        PluginWarning,
        StrategyError,
        StrategyWarning,
        UnknownCombinationError,
    )
    from combframe.mtenn import CombinationFunction
    from combframe.mtenn.config import from_mtenn_config, migrate_mtenn_config
    from combframe.registry import (
        create_combination,
        describe_combinations,
        get_combination_class,
        list_combinations,
        plugin_errors,
        register_plugin,
        reload_registry,
    )
    from combframe.registry.config import CombinationConfig, combination_config_schema

__all__ = [
    "Auto",
    "CombframeError",
    "CombframeWarning",
    "Combination",
    "CombinationConfig",
    "CombinationError",
    "CombinationFunction",
    "CombinationParams",
    "CompoundPredictions",
    "InvalidParametersError",
    "InvalidPluginError",
    "MultiPoseModel",
    "PluginWarning",
    "Recompute",
    "Store",
    "StrategyError",
    "StrategyWarning",
    "Stream",
    "StreamingCombination",
    "UnknownCombinationError",
    "combination_config_schema",
    "create_combination",
    "default_collate",
    "describe_combinations",
    "from_mtenn_config",
    "get_combination_class",
    "list_combinations",
    "migrate_mtenn_config",
    "plugin_errors",
    "pose_weights",
    "register_plugin",
    "reload_registry",
]

#: Where each public name lives.
_HOMES = {
    "Combination": "combframe.core.combination",
    "CombinationParams": "combframe.core.combination",
    "StreamingCombination": "combframe.core.combination",
    "CompoundPredictions": "combframe.core.batch",
    "default_collate": "combframe.core.batch",
    "MultiPoseModel": "combframe.core.model",
    "pose_weights": "combframe.core.weights",
    "Auto": "combframe.core.strategies",
    "Recompute": "combframe.core.strategies",
    "Store": "combframe.core.strategies",
    "Stream": "combframe.core.strategies",
    "CombframeError": "combframe.errors",
    "CombframeWarning": "combframe.errors",
    "CombinationError": "combframe.errors",
    "InvalidParametersError": "combframe.errors",
    "InvalidPluginError": "combframe.errors",
    "PluginWarning": "combframe.errors",
    "StrategyError": "combframe.errors",
    "StrategyWarning": "combframe.errors",
    "UnknownCombinationError": "combframe.errors",
    "CombinationFunction": "combframe.mtenn",
    "from_mtenn_config": "combframe.mtenn.config",
    "migrate_mtenn_config": "combframe.mtenn.config",
    "CombinationConfig": "combframe.registry.config",
    "combination_config_schema": "combframe.registry.config",
    "create_combination": "combframe.registry",
    "describe_combinations": "combframe.registry",
    "get_combination_class": "combframe.registry",
    "list_combinations": "combframe.registry",
    "plugin_errors": "combframe.registry",
    "register_plugin": "combframe.registry",
    "reload_registry": "combframe.registry",
}

#: Names of the 0.1 releases that are not public API any more: each still works, with a
#: DeprecationWarning naming what to use instead (module, attribute, replacement).
_DEPRECATED = {
    "BaseCombination": ("combframe.core.combination", "Combination", "combframe.Combination"),
    "ParamLayout": ("combframe.core.gradients", "ParamLayout", "nothing: it is internal"),
    "PoseGradients": ("combframe.core.gradients", "PoseGradients", "nothing: it is internal"),
    "Strategy": (
        "combframe.core.strategies",
        "Strategy",
        "combframe.Store, Recompute, Stream or Auto",
    ),
    "PluginValidationError": (
        "combframe.errors",
        "InvalidPluginError",
        "combframe.InvalidPluginError",
    ),
    "CombinationInfo": (
        "combframe.registry",
        "CombinationInfo",
        "combframe.registry.CombinationInfo",
    ),
    "ParameterInfo": ("combframe.registry", "ParameterInfo", "combframe.registry.ParameterInfo"),
    "PluginLoadError": (
        "combframe.registry",
        "PluginLoadError",
        "combframe.registry.PluginLoadError",
    ),
    "resolve_combination": (
        "combframe.registry",
        "create_combination",
        "combframe.create_combination",
    ),
    "hookimpl": (
        "combframe.registry",
        "hookimpl",
        "nothing: a plugin's entry point names its Combination classes or their module",
    ),
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("combframe")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            return "0+unknown"
    if name in _DEPRECATED:
        home, attr, instead = _DEPRECATED[name]
        warnings.warn(
            f"combframe.{name} is deprecated and will be removed; use {instead}",
            DeprecationWarning,
            stacklevel=2,
        )
        importlib.import_module("combframe.registry")
        return getattr(importlib.import_module(home), attr)
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # installs the core's name resolver and mtenn's call before any name is handed out
    importlib.import_module("combframe.registry")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
