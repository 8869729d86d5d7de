"""mtenn compatibility in one place: its call, its ``*CombinationFunc`` Functions, its configs.

- :mod:`combframe.mtenn.function`: the autograd Function behind mtenn's call
  ``comb(pred_list, grad_dict, param_names, *model_params)``, and
  :func:`mtenn_function`, which derives mtenn's Function with the call
  ``apply(*hyperparameters, pred_list, grad_dict, param_names, *model_params)`` for a
  combination class (a plugin publishes it as
  ``MaxCombinationFunc = mtenn_function(MaxCombination)``).
- :mod:`combframe.mtenn.config`: mtenn's flat config fields (``max_comb_scale`` and the
  like), read into a :class:`~combframe.CombinationConfig` and rewritten.

The config names are loaded on first use: the registry imports
:mod:`combframe.mtenn.function` (it installs mtenn's call in the core), and the config
module imports the registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from combframe.mtenn.function import CombinationFunction, mtenn_function

if TYPE_CHECKING:
    from combframe.mtenn.config import from_mtenn_config, migrate_mtenn_config, mtenn_fields

__all__ = [
    "CombinationFunction",
    "from_mtenn_config",
    "migrate_mtenn_config",
    "mtenn_fields",
    "mtenn_function",
]

_CONFIG = frozenset({"from_mtenn_config", "migrate_mtenn_config", "mtenn_fields"})


def __getattr__(name: str) -> Any:
    if name not in _CONFIG:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("combframe.mtenn.config"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
