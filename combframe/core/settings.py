r"""A combination's settings: which fields may be learned (their bounds kept), saved states.

A combination built with ``learn=[...]`` holds, for each named field, an unconstrained
``nn.Parameter`` :math:`r` (``raw_<field>``) and reads the field as :func:`constrain` of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from torch import Tensor

from combframe.errors import CombinationError, InvalidParametersError

__all__ = [
    "bounds",
    "check_saved",
    "checked_learn",
    "constrain",
    "learnable_fields",
    "normalize_name",
    "unconstrain",
    "validated",
]


def learnable_fields(params: type[BaseModel]) -> tuple[str, ...]:
    r"""Return the parameters of a ``Params`` model that may be learned: its ``float`` fields.

    A learned value is kept inside the field's bounds by a parametrization of an
    unconstrained :math:`r` (the ``nn.Parameter`` ``raw_<field>``): :math:`a +
    \operatorname{softplus}(r)` for a lower bound :math:`a` alone (``gt``/``ge``),
    :math:`b - \operatorname{softplus}(r)` for an upper bound :math:`b` alone,
    :math:`a + (b - a)\,\sigma(r)` for both, and :math:`r` itself for none.
    """
    return tuple(f for f, info in params.model_fields.items() if info.annotation is float)


def checked_learn(name: str, params: type[BaseModel], learn: Iterable[str]) -> tuple[str, ...]:
    """Return ``learn`` as learnable fields of combination ``name`` in field order, or raise.

    Raises
    ------
    CombinationError
        If ``learn`` is a string (not a list of names), names a field twice, or names
        something that is not a learnable field of ``params``; the message lists them.
    """
    if isinstance(learn, str):
        raise CombinationError(
            f"learn={learn!r} is a string; give a list of parameter names, learn=[{learn!r}]"
        )
    names = list(learn)
    allowed = learnable_fields(params)
    wrong = [n for n in names if n not in allowed]
    if wrong or len(set(names)) != len(names):
        raise CombinationError(
            f"cannot learn {wrong or names} of combination {name!r}: the learnable "
            f"parameters (its float fields, each named once) are {list(allowed)}"
        )
    return tuple(f for f in allowed if f in names)


def bounds(info: FieldInfo) -> tuple[float | None, float | None]:
    """Return the (lower, upper) bounds of a field from its ``gt``/``ge``/``lt``/``le``."""
    lower = upper = None
    for item in info.metadata:
        bound = getattr(item, "gt", getattr(item, "ge", None))
        lower = float(bound) if bound is not None else lower
        bound = getattr(item, "lt", getattr(item, "le", None))
        upper = float(bound) if bound is not None else upper
    return lower, upper


def constrain(info: FieldInfo, raw: Tensor) -> Tensor:
    """Map the unconstrained ``raw`` into the field's bounds (see :func:`learnable_fields`)."""
    lower, upper = bounds(info)
    if lower is not None and upper is not None:
        return lower + (upper - lower) * torch.sigmoid(raw)
    if lower is not None:
        return lower + torch.nn.functional.softplus(raw)
    if upper is not None:
        return upper - torch.nn.functional.softplus(raw)
    return raw


def unconstrain(info: FieldInfo, field: str, value: float) -> float:
    """Return the ``raw`` that :func:`constrain` maps to ``value``; it must lie inside."""
    lower, upper = bounds(info)
    inside = (lower is None or value > lower) and (upper is None or value < upper)
    if not (inside and math.isfinite(value)):
        raise CombinationError(
            f"a learned {field} starts at {value!r}, which is not strictly inside its bounds "
            f"({lower}, {upper}); start it inside them"
        )
    if lower is not None and upper is not None:
        p = (value - lower) / (upper - lower)
        return math.log(p) - math.log1p(-p)
    if lower is None and upper is None:
        return value
    x = value - lower if lower is not None else (upper or 0.0) - value
    return x + math.log(-math.expm1(-x))  # softplus^-1(x)


def check_saved(
    state: Any,
    name: str,
    names: set[str],
    cls_name: str,
    current: Mapping[str, Any],
    learn: tuple[str, ...],
) -> None:
    """Check a saved combination state against a combination; raise if they differ.

    ``names`` are the combination's normalized names and aliases, ``current`` its
    parameters in JSON form and ``learn`` its learned ones (whose values may differ: the
    state_dict carries them). See :meth:`combframe.Combination.set_extra_state`.
    """
    if not (
        isinstance(state, Mapping)
        and isinstance(state.get("name"), str)
        and isinstance(state.get("params"), Mapping)
    ):
        raise CombinationError(
            f"the state_dict's combination state {state!r} is not a mapping "
            "{'name': str, 'params': {...}} as Combination.get_extra_state writes it"
        )
    learned = {"learn": list(state["learn"])} if state.get("learn") else {}
    saved = {"name": state["name"], **state["params"], **learned}
    build = (
        f"build the model with the saved combination, MultiPoseModel(model, {saved!r}), "
        "and load again"
    )
    if normalize_name(state["name"]) not in names:
        raise CombinationError(
            f"the state_dict was saved with combination {state['name']!r}, but this "
            f"model's combination is {name!r}; {build}"
        )
    saved_learn = sorted(state.get("learn", ()))
    if saved_learn != sorted(learn):
        raise CombinationError(
            f"the state_dict was saved with {name}'s learned parameters "
            f"{saved_learn}, but this model's combination learns {sorted(learn)}; "
            f"{build}"
        )
    for field, value in state["params"].items():
        if field not in current:
            raise CombinationError(
                f"the state_dict's combination {name!r} has parameter {field!r} "
                f"(= {value!r}), which this version of {cls_name} does not "
                f"know (it has {sorted(current)}); {build}"
            )
        if field not in learn and current[field] != value:
            raise CombinationError(
                f"the state_dict was saved with {name}'s {field}={value!r}, but "
                f"this model's combination has {field}={current[field]!r}; {build}"
            )


def normalize_name(name: str) -> str:
    """Case-fold a combination name and treat ``-`` and ``_`` alike.

    >>> normalize_name(" Smooth-Max ")
    'smooth_max'
    """
    return name.strip().lower().replace("-", "_")


def validated(params: type[BaseModel], values: Mapping[str, Any]) -> Any:
    """Return ``params`` validated from ``values``, or raise :class:`InvalidParametersError`."""
    try:
        return params.model_validate(dict(values))
    except ValidationError as exc:
        raise InvalidParametersError.of(exc) from None
