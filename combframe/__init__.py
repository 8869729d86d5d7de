"""combframe: combine per-pose predictions with exact gradients, one pose graph at a time."""

from __future__ import annotations

from typing import Any

from combframe.core.batch import CompoundPredictions, default_collate
from combframe.core.combination import (
    BaseCombination,
    Combination,
    CombinationParams,
    StreamingCombination,
)
from combframe.core.function import CombinationFunction
from combframe.core.gradients import ParamLayout, PoseGradients
from combframe.core.model import MultiPoseModel
from combframe.core.strategies import Recompute, Store, Strategy, Stream
from combframe.errors import (
    CombinationError,
    PluginValidationError,
    PluginWarning,
    StrategyError,
    StrategyWarning,
    UnknownCombinationError,
)
from combframe.mtenn import from_mtenn_config, migrate_mtenn_config
from combframe.registry import (
    CombinationInfo,
    ParameterInfo,
    PluginLoadError,
    create_combination,
    describe_combinations,
    get_combination_class,
    list_combinations,
    plugin_errors,
    register_plugin,
    reload_registry,
    resolve_combination,
)
from combframe.registry.config import CombinationConfig, combination_config_schema
from combframe.registry.hookspecs import hookimpl, hookspec

__all__ = [
    "BaseCombination",
    "Combination",
    "CombinationConfig",
    "CombinationError",
    "CombinationFunction",
    "CombinationInfo",
    "CombinationParams",
    "CompoundPredictions",
    "MultiPoseModel",
    "ParamLayout",
    "ParameterInfo",
    "PluginLoadError",
    "PluginValidationError",
    "PluginWarning",
    "PoseGradients",
    "Recompute",
    "Store",
    "Strategy",
    "StrategyError",
    "StrategyWarning",
    "Stream",
    "StreamingCombination",
    "UnknownCombinationError",
    "__version__",
    "combination_config_schema",
    "create_combination",
    "default_collate",
    "describe_combinations",
    "from_mtenn_config",
    "get_combination_class",
    "hookimpl",
    "hookspec",
    "list_combinations",
    "migrate_mtenn_config",
    "plugin_errors",
    "register_plugin",
    "reload_registry",
    "resolve_combination",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("combframe")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
