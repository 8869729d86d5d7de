r"""Per-pose priors and masks from a pose field: ``prior.*`` and ``mask.*`` of a run.

A pose field is a number every pose of a compound carries beside its atoms or features:
an SD property of an SDF record (a docking score, a POSIT probability, a GNINA
CNNscore), the ``mmff_energy`` of a minimised conformer, or an entry of a JSON pose's
``properties``. :func:`with_priors` turns the field ``prior.field`` names into each
pose's log prior weight :math:`p_i = \log\pi_i` (``Compound.prior``), by ``prior.kind``:

- ``log_weight``: :math:`p_i = x_i`, the field as it is;
- ``probability``: :math:`p_i = \log x_i`, for :math:`0 < x_i \le 1`;
- ``energy``: :math:`p_i = -(E_i - \min_j E_j)/kT` with ``prior.kT``, Boltzmann weights
  of the compound's poses, the lowest pose kept (not masked) at :math:`\pi = 1`;

and ``mask.field`` into :math:`p_i = -\infty` where the field is 0 (the pose is left
out). The combination adds :math:`p_i` to its log weights (:mod:`combframe.core.weights`);
:func:`log_priors` hands them to ``MultiPoseModel``'s call. It runs once, when the data
are loaded: a missing, non-finite or out-of-range value stops the run before training,
naming the compound and the pose.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

import combframe
from combframe.app.config import ConfigError, TrainConfig, did_you_mean
from combframe.app.data import MMFF_ENERGY, Compound
from combframe.app.models import pooled_dim

__all__ = ["check_priors", "log_priors", "with_priors"]


def _uses_fields(config: TrainConfig) -> bool:
    return bool(_fields_read(config))


def check_priors(config: TrainConfig) -> None:
    """Refuse ``prior.field`` or ``mask.field`` for a combination that takes no prior.

    The message is the combination's own refusal (:func:`combframe.pose_weights` on one
    pose, of ``dim`` values for a pooling combination), so it names the combination and
    says which ones take a prior.
    """
    if not _uses_fields(config):
        return
    key = "prior.field" if config.prior.field is not None else "mask.field"
    combination = config.combination.build()
    pose = torch.zeros(1, pooled_dim(combination)) if combination.pools else torch.zeros(1)
    try:
        combframe.pose_weights(combination, pose, prior=torch.zeros(1))
    except combframe.CombinationError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _label(compound: Compound) -> str:
    return f"compound {compound.name!r}" if compound.name is not None else "a compound"


def _why_missing(compound: Compound, name: str) -> str | None:
    """Say why ``compound`` has no pose field ``name`` if the reader knows (else None)."""
    why = (compound.missing or {}).get(name)
    return None if why is None else f"{_label(compound)}: {why}, so it has no {name}"


def _fields_read(config: TrainConfig) -> list[tuple[str, str]]:
    """Return the ``(key, pose field)`` pairs of ``prior.field`` and ``mask.field`` set."""
    pairs = (("prior.field", config.prior.field), ("mask.field", config.mask.field))
    return [(key, name) for key, name in pairs if name is not None]


def _field(compound: Compound, name: str, key: str) -> Tensor:
    """Return the ``(N,)`` values of the pose field ``name`` of ``compound``, or raise."""
    fields = dict(compound.properties or {})
    label = _label(compound)
    if (why := _why_missing(compound, name)) is not None:
        raise ConfigError(f"{key}: {why}; remove it from the input or use reader.skip_invalid=true")
    if name not in fields:
        known = ", ".join(sorted(fields)) or "none"
        hint = did_you_mean(name, list(fields))
        if name == MMFF_ENERGY:
            hint += "; generated conformers have it with reader.minimize=true"
        raise ConfigError(
            f"{key}: {label} has no pose field {name!r} (its pose fields: {known}){hint}"
        )
    values = fields[name].detach().double().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        pose = int(bad[0])
        what = "has no value" if math.isnan(float(values[pose])) else f"is {float(values[pose])}"
        raise ConfigError(
            f"{key}: pose {pose} of {label}: the field {name!r} {what}; every pose needs a "
            "finite number (leave such poses out of the input)"
        )
    return values


def _log_weight(compound: Compound, config: TrainConfig) -> Tensor:
    """Return ``compound``'s ``(N,)`` log prior weights (float64; ``-inf``: masked)."""
    keep = torch.ones(len(compound.poses), dtype=torch.bool)
    if config.mask.field is not None:
        x = _field(compound, config.mask.field, "mask.field")
        odd = ((x != 0) & (x != 1)).nonzero()
        if len(odd):
            pose = int(odd[0])
            raise ConfigError(
                f"mask.field: pose {pose} of {_label(compound)}: {config.mask.field} is "
                f"{float(x[pose]):g}, not 0 or 1: a mask keeps (1) or drops (0) a pose; for "
                f"fractional weights use prior.field={config.mask.field} (prior.kind: "
                "probability or log_weight)"
            )
        keep = x == 1
        if not keep.any():
            raise ConfigError(
                f"mask.field: every pose of {_label(compound)} has {config.mask.field} "
                "= 0; keep at least one (or leave the compound out of the input)"
            )
    p = torch.zeros(len(compound.poses), dtype=torch.float64)
    prior = config.prior
    if prior.field is not None:
        x = _field(compound, prior.field, "prior.field")
        if prior.kind == "probability":
            bad = ((x <= 0) | (x > 1)).nonzero()
            if len(bad):
                pose = int(bad[0])
                raise ConfigError(
                    f"prior.kind: pose {pose} of {_label(compound)}: {prior.field} is "
                    f"{float(x[pose]):g}, not a probability in (0, 1]; use prior.kind="
                    "log_weight or energy for other numbers"
                )
            x = x.log()
        elif prior.kind == "energy":  # from the lowest pose kept; a masked one does not count
            x = -(x - x[keep].min()) / prior.kT
        p = x
    return p.masked_fill(~keep, -math.inf)


def with_priors(
    config: TrainConfig, compounds: Sequence[Compound], source: str
) -> tuple[tuple[Compound, ...], tuple[str, ...]]:
    """Return ``compounds`` with every ``prior`` set from ``config`` (if it asks).

    ``compounds`` are in file order (before the split), so an error names the first
    compound of the file that has it. With ``reader.skip_invalid``, a compound whose
    field is missing for a known reason (``mmff_energy`` of a molecule MMFF94 could not
    minimise) is left out and counted.

    Returns
    -------
    tuple
        The compounds kept, and one line per compound left out.

    Raises
    ------
    ConfigError
        Naming the key, the compound and the pose: a field a compound lacks (with the
        fields it has and the closest name, or why it has none), a pose without a finite
        value, a probability outside ``(0, 1]``, a compound with every pose masked; the
        built-in synthetic set (``source`` ``"built-in"``), which has no pose fields.
    """
    if not _uses_fields(config):
        return tuple(compounds), ()
    if source == "built-in":
        raise ConfigError(
            "prior.field/mask.field: the built-in synthetic set has no pose fields; give "
            "data=... with per-pose numbers (docs/data.md)"
        )
    kept, skipped = [], []
    for compound in compounds:
        if config.reader.skip_invalid:
            why = [(k, w) for k, n in _fields_read(config) if (w := _why_missing(compound, n))]
            if why:
                skipped.append(f"{why[0][1]} ({why[0][0]})")
                continue
        kept.append(dataclasses.replace(compound, prior=_log_weight(compound, config)))
    return tuple(kept), tuple(skipped)


def log_priors(compounds: Sequence[Compound]) -> list[Tensor] | None:
    """Return the ``prior=`` of a ``MultiPoseModel`` call on ``compounds`` (None: no prior)."""
    priors = [c.prior for c in compounds]
    if all(p is None for p in priors):
        return None
    if any(p is None for p in priors):
        raise ConfigError("some compounds have a prior and some not; load them together")
    return [p for p in priors if p is not None]
