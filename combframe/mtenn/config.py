"""mtenn's flat config fields, read and rewritten.

mtenn (and asapdiscovery configs built on it) describe the combination with flat
fields of the model config; each combination declares its own in ``mtenn_fields``. The
shipped ones:

========================  ======================================  ==========================
mtenn field               meaning                                 combframe parameter
========================  ======================================  ==========================
``combination``           ``"mean"``, ``"max"`` (enum or str)     ``name``
``max_comb_neg``          smooth min instead of max               ``negate_preds`` (max)
``max_comb_scale``        sharpness of the smooth max             ``pred_scale`` (max)
``boltzmann_comb_kT``     thermal energy of the Boltzmann mean    ``kT`` (boltzmann)
========================  ======================================  ==========================

``boltzmann_comb_kT`` is combframe's name for the Boltzmann parameter in the same flat
style (mtenn has no such field). Fields that belong to another combination are ignored,
as mtenn ignores ``max_comb_*`` for a mean.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from combframe.core.combination import Combination
from combframe.errors import CombinationError
from combframe.registry import current_registry, describe_combinations
from combframe.registry.config import CombinationConfig

__all__ = ["from_mtenn_config", "migrate_mtenn_config", "mtenn_fields"]

_MISSING: Final = object()


def mtenn_fields() -> dict[str, dict[str, str]]:
    """For each installed combination that declares any, mtenn field -> its parameter."""
    return {
        info.name: dict(info.combination_class.mtenn_fields)
        for info in describe_combinations()
        if info.combination_class is not None and info.combination_class.mtenn_fields
    }


def _get(config: Any, field: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(field, _MISSING)
    return getattr(config, field, _MISSING)


def from_mtenn_config(config: Mapping[str, Any] | object) -> CombinationConfig | None:
    """Build a :class:`CombinationConfig` from mtenn-style model-config fields.

    Parameters
    ----------
    config
        A mapping (a parsed YAML/JSON model config) or an object with attributes (an
        mtenn ``ModelConfigBase`` instance). Read: ``combination`` (a name, a string
        enum member, or already a combframe config/mapping/module), and the parameter
        fields the combination declares in ``mtenn_fields`` (``max_comb_neg``,
        ``max_comb_scale``, ``boltzmann_comb_kT``); everything else is ignored.

    Returns
    -------
    CombinationConfig or None
        ``None`` when ``combination`` is missing or ``None`` (a single-pose model).

    Raises
    ------
    UnknownCombinationError
        If the combination name is not installed (the message suggests the closest).
    CombinationError
        If a parameter field is invalid; the message names the mtenn field, the
        combframe parameter and the violated bound.

    Examples
    --------
    >>> import combframe.mtenn
    >>> combframe.mtenn.from_mtenn_config(
    ...     {"combination": "max", "max_comb_neg": True, "max_comb_scale": 100.0}
    ... )
    CombinationConfig(name='max', negate_preds=True, pred_scale=100.0)
    """
    value = _get(config, "combination")
    if value is _MISSING or value is None:
        return None
    if isinstance(value, CombinationConfig):
        return value
    if isinstance(value, Combination):
        return CombinationConfig.from_combination(value)
    if isinstance(value, Mapping):
        return CombinationConfig.model_validate(value)
    if isinstance(value, enum.Enum):
        value = value.value
    if not isinstance(value, str):
        raise CombinationError(
            f"mtenn field 'combination' must be a combination name such as 'max'; got {value!r}"
        )
    canonical, cls = current_registry().resolve(value)
    params = _mtenn_params(config, canonical, cls.mtenn_fields)
    try:
        return CombinationConfig(name=canonical, **params)
    except ValidationError as exc:
        raise _migration_error(value, cls.mtenn_fields, exc) from exc


def _mtenn_params(config: Any, canonical: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """Return the parameters the mtenn fields give (a ``None`` field is refused)."""
    params: dict[str, Any] = {}
    for field, param in fields.items():
        given = _get(config, field)
        if given is None:
            raise CombinationError(
                f"mtenn field {field!r} is None; mtenn itself requires a value there. Give "
                f"one (it becomes {canonical}'s {param!r}) or leave the field out for the "
                "default"
            )
        if given is not _MISSING:
            params[param] = given
    return params


def _migration_error(
    value: str, fields: Mapping[str, str], exc: ValidationError
) -> CombinationError:
    """Say which mtenn field (and which parameter it sets) failed validation, and why."""
    back = {param: field for field, param in fields.items()}
    lines = []
    for err in exc.errors():
        param = str(err["loc"][0]) if err["loc"] else "?"
        where = f"{back[param]} (-> {param})" if param in back else param
        lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return CombinationError(f"cannot migrate the mtenn combination {value!r}: " + "; ".join(lines))


def migrate_mtenn_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite an mtenn-style config mapping to the combframe form.

    Returns a new dict in which ``combination`` is the ``{"name": ..., <params>}``
    mapping of :func:`from_mtenn_config` and the mtenn parameter fields
    (``max_comb_neg``, ``max_comb_scale``, ``boltzmann_comb_kT``) are removed; other keys
    are kept as they are. Useful to upgrade YAML files once.

    Examples
    --------
    >>> from combframe.mtenn import migrate_mtenn_config
    >>> migrate_mtenn_config({"combination": "mean", "max_comb_scale": 1000, "lr": 0.1})
    {'combination': {'name': 'mean'}, 'lr': 0.1}
    """
    combination = from_mtenn_config(config)
    known = {field for fields in mtenn_fields().values() for field in fields}
    out = {k: v for k, v in config.items() if k not in known}
    if combination is not None or "combination" in config:
        out["combination"] = None if combination is None else combination.model_dump(mode="json")
    return out
