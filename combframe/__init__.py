"""combframe: combine per-pose predictions with exact gradients, one pose graph at a time."""

from __future__ import annotations

from typing import Any

from combframe._combination import (
    BaseCombination,
    Combination,
    CombinationParams,
    StreamingCombination,
)
from combframe._errors import (
    CombinationError,
    PluginValidationError,
    StrategyError,
    UnknownCombinationError,
)
from combframe._function import CombinationFunction
from combframe._gradients import ParamLayout, PoseGradients
from combframe._hookspecs import hookimpl, hookspec
from combframe._model import MultiPoseModel
from combframe._registry import create_combination, get_combination_class, list_combinations
from combframe._strategies import Recompute, Store, Strategy, Stream

__all__ = [
    "BaseCombination",
    "Combination",
    "CombinationError",
    "CombinationFunction",
    "CombinationParams",
    "MultiPoseModel",
    "ParamLayout",
    "PluginValidationError",
    "PoseGradients",
    "Recompute",
    "Store",
    "Strategy",
    "StrategyError",
    "Stream",
    "StreamingCombination",
    "UnknownCombinationError",
    "__version__",
    "create_combination",
    "get_combination_class",
    "hookimpl",
    "hookspec",
    "list_combinations",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("combframe")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
