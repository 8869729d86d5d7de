r"""A built-in, deterministic synthetic multi-pose dataset.

Each compound has a latent descriptor :math:`c \in \mathbb{R}^F`; its poses are
:math:`x_i = c + \sigma \varepsilon_i` with :math:`\varepsilon_i \sim \mathcal{N}(0, I)`.
A fixed random *teacher* network :math:`g` (drawn from the seed) gives every pose a
free energy :math:`g(x_i)` in kcal/mol, and the compound's value is set by its best pose,

.. math::

    \Delta G = \min_i g(x_i) + \eta, \qquad \eta \sim \mathcal{N}(0, \text{noise}^2).

A single-pose model combined with a smooth minimum can represent this exactly; the mean
of the per-pose predictions cannot, which is what ``combframe train --compare`` shows.
Everything is generated from ``seed`` with a private :class:`torch.Generator`, so the
same arguments give bit-identical data on every machine.

:func:`load_compounds` reads a user's own compounds from a JSON file instead (the format
is in ``docs/cli.md``) and :func:`split_compounds` holds some of them out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from combframe.errors import CombframeError

__all__ = [
    "MMFF_ENERGY",
    "Compound",
    "DataError",
    "Dataset",
    "load_compounds",
    "make_dataset",
    "split_compounds",
]


#: The pose field of a generated conformer's MMFF energy (``reader.minimize=true``),
#: kcal/mol, relative to the compound's lowest conformer.
MMFF_ENERGY = "mmff_energy"


@dataclass(frozen=True)
class Compound:
    """One compound: its poses and its compound-level value.

    Attributes
    ----------
    poses
        Feature vectors: shape ``(N, 1, F)``, N poses, each a ``(1, F)`` row that a
        single-pose model maps to one prediction. Molecules: a tuple of N PyTorch
        Geometric ``Data``, each with ``pos`` (n, 3), ``z`` (n,) atomic numbers and ``lig``
        (n,) ligand flags (see :mod:`combframe.app.readers`).
    target
        0-d tensor, the compound's free energy (the best pose's, plus noise); with
        several targets (a list ``reader.target``) shape ``(d,)``, NaN where the
        compound has no value for a target.
    pose_energies
        Shape ``(N,)``, the teacher's free energy of every pose (for inspection only);
        None for compounds read from a file.
    name
        The compound's name in its file, or None.
    properties
        Per-pose numbers read with the poses (an SDF's docking scores), each ``(N,)``;
        NaN where a pose lacks one.
    prior
        Shape ``(N,)``, each pose's log prior weight in the combination (``-inf``: left
        out), set from ``properties`` by :func:`combframe.app.priors.with_priors`; None:
        no prior.
    missing
        Why a pose field has no value, by field name: ``mmff_energy`` of conformers that
        ``reader.minimize`` could not minimise (MMFF94 has no parameters for the
        molecule); None: nothing known to be missing.
    """

    poses: Tensor | tuple[Any, ...]
    target: Tensor
    pose_energies: Tensor | None = None
    name: str | None = None
    properties: Mapping[str, Tensor] | None = None
    prior: Tensor | None = None
    missing: Mapping[str, str] | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Compound:
        """Return the compound with poses, target and prior on ``device`` (floats in ``dtype``).

        Feature-vector poses move as one tensor, molecular poses (``Data``) one by one,
        their coordinates cast to ``dtype`` when given.
        """
        if isinstance(self.poses, Tensor):
            poses: Tensor | tuple[Any, ...] = self.poses.to(device, dtype)
        else:
            poses = tuple(_pose_to(p, device, dtype) for p in self.poses)
        target = self.target.to(device, dtype)
        prior = None if self.prior is None else self.prior.to(device, dtype)
        return Compound(
            poses,
            target,
            name=self.name,
            properties=self.properties,
            prior=prior,
            missing=self.missing,
        )


def _pose_to(pose: Any, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    moved = pose.to(device)
    if dtype is not None:
        moved.pos = moved.pos.to(dtype)
    return moved


@dataclass(frozen=True)
class Dataset:
    """The compounds of a run, split, and where they come from.

    Attributes
    ----------
    train, test
        The two splits; ``test`` is never trained on.
    features
        Features of a pose (0 for molecules).
    source
        ``"built-in"``, the path of the compounds file or ``"built-in <name>"``.
    kind
        ``"vectors"`` (poses are feature rows) or ``"molecules"`` (PyG ``Data``).
    skipped
        What ``reader.skip_invalid`` left out, one line each.
    targets
        The names of several targets (each compound's target is ``(d,)``); ``()`` for
        one value per compound (a 0-d target).
    """

    train: tuple[Compound, ...]
    test: tuple[Compound, ...]
    features: int
    source: str = "built-in"
    kind: str = "vectors"
    skipped: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()


def _teacher(features: int, hidden: int, gen: torch.Generator) -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5))
    return net


def _check_sizes(
    n_compounds: int, poses_per_compound: int, features: int, test_fraction: float
) -> None:
    if n_compounds < 2:
        raise ValueError(f"n_compounds must be at least 2 (one per split); got {n_compounds}")
    if poses_per_compound < 1:
        raise ValueError(f"poses_per_compound must be at least 1; got {poses_per_compound}")
    if features < 1:
        raise ValueError(f"features must be at least 1; got {features}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1; got {test_fraction}")


def _draw(
    n_compounds: int,
    poses_per_compound: int,
    features: int,
    pose_spread: float,
    noise: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw the poses, the teacher's pose energies and the compounds' values."""
    gen = torch.Generator().manual_seed(seed)
    teacher = _teacher(features, 16, gen)
    centers = torch.randn((n_compounds, 1, features), generator=gen, dtype=torch.float64)
    offsets = torch.randn(
        (n_compounds, poses_per_compound, features), generator=gen, dtype=torch.float64
    )
    poses = (centers + pose_spread * offsets).float()
    with torch.no_grad():
        energies = -8.0 + 3.0 * teacher(poses).squeeze(-1)
    targets = energies.amin(dim=1) + noise * torch.randn(n_compounds, generator=gen)
    return poses, energies, targets


def make_dataset(
    *,
    n_compounds: int = 240,
    poses_per_compound: int = 8,
    features: int = 8,
    pose_spread: float = 1.0,
    noise: float = 0.1,
    test_fraction: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    r"""Generate the synthetic dataset described in the module docstring.

    Parameters
    ----------
    n_compounds
        Number of compounds in both splits together.
    poses_per_compound
        Poses N of every compound.
    features
        Features F of a pose.
    pose_spread
        :math:`\sigma`, how far a compound's poses lie from its descriptor.
    noise
        Standard deviation of the label noise, kcal/mol.
    test_fraction
        Share of compounds held out; at least one compound lands in each split.
    seed
        Seed of the private generator; the data depend on nothing else.
    dtype
        Floating dtype of poses and targets.

    Returns
    -------
    Dataset
        The two splits; each compound is named by its index, ``"0"`` to ``"C-1"``.

    Raises
    ------
    ValueError
        If a count is below its minimum or ``test_fraction`` is outside ``(0, 1)``.
    """
    _check_sizes(n_compounds, poses_per_compound, features, test_fraction)
    poses, energies, targets = _draw(
        n_compounds, poses_per_compound, features, pose_spread, noise, seed
    )
    n_test = _n_test(test_fraction, n_compounds)
    compounds = tuple(
        Compound(
            poses=poses[c].unsqueeze(1).to(dtype),
            target=targets[c].to(dtype),
            pose_energies=energies[c].to(dtype),
            name=str(c),
        )
        for c in range(n_compounds)
    )
    return Dataset(train=compounds[n_test:], test=compounds[:n_test], features=features)


def _n_test(test_fraction: float, n_compounds: int) -> int:
    """Held-out compounds: ``test_fraction`` of them, at least one in each split."""
    return min(max(1, round(test_fraction * n_compounds)), n_compounds - 1)


# ---- a user's compounds -------------------------------------------------------------


class DataError(CombframeError, ValueError):
    """A compounds file that cannot be used; the message names the compound and problem.

    Attributes
    ----------
    key
        The config key whose file it is: ``data``, or ``reader.values`` for a file that
        ``reader.*`` names.
    """

    def __init__(self, message: str, key: str = "data") -> None:
        super().__init__(message)
        self.key = key


_KEYS = ("name", "value", "poses", "properties")


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{str(path)!r} is not a UTF-8 text (JSON) file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise DataError(
            f"{str(path)!r} is nested too deeply to be a compounds file (see docs/cli.md)"
        ) from None


def _label(index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"compounds[{index}] ({name!r})" if isinstance(name, str) else f"compounds[{index}]"


def _check_value(entry: dict[str, Any]) -> float:
    if "value" not in entry:
        raise DataError("has no 'value' (its measured value, a number)")
    return _finite(entry["value"], "'value'")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{what} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise DataError(f"{what} is {value}; values must be finite")
    return float(value)


def _check_values(entry: dict[str, Any], targets: Sequence[str], values: bool) -> list[float]:
    """Return the values of several ``targets``: ``value`` maps each name to a number or null.

    A name absent or null is a value the compound lacks (NaN); with ``values`` at least
    one must be present.
    """
    given = entry.get("value", {} if not values else None)
    if not isinstance(given, dict):
        raise DataError(
            f"'value' must map each target ({', '.join(targets)}) to a number or null; "
            f"got {given!r:.60}"
        )
    unknown = [k for k in given if k not in targets]
    if unknown:
        from combframe.app.config import did_you_mean

        raise DataError(
            f"'value' names {unknown[0]!r}, which is not a target"
            f"{did_you_mean(str(unknown[0]), list(targets))}; the targets (reader.target): "
            f"{', '.join(targets)}"
        )
    out = [
        math.nan if given.get(t) is None else _finite(given[t], f"'value' {t!r}") for t in targets
    ]
    if values and all(math.isnan(v) for v in out):
        raise DataError(f"has no value for any target ({', '.join(targets)}); give one at least")
    return out


def _check_poses(entry: dict[str, Any], features: int | None, dtype: torch.dtype) -> Tensor:
    poses = entry.get("poses")
    if not isinstance(poses, list):
        what = "has no 'poses'" if poses is None else f"'poses' is a {type(poses).__name__}"
        raise DataError(f"{what}; expected a list of poses, each a list of features")
    if not poses:
        raise DataError("has no poses; every compound needs at least one")
    for i, pose in enumerate(poses):
        if not isinstance(pose, list) or not pose:
            raise DataError(f"pose {i} is not a non-empty list of numbers; got {pose!r:.60}")
        if features is not None and len(pose) != features:
            raise DataError(
                f"pose {i} has {len(pose)} features; expected {features}, as the first "
                "compound's poses have"
            )
        if len(pose) != len(poses[0]):
            raise DataError(f"pose {i} has {len(pose)} features, pose 0 has {len(poses[0])}")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in pose):
            raise DataError(f"pose {i} holds something other than numbers: {pose!r:.60}")
    tensor = torch.tensor(poses, dtype=torch.float64)
    bad = (~torch.isfinite(tensor)).nonzero()
    if len(bad):
        pose, feature = (int(v) for v in bad[0])
        raise DataError(
            f"pose {pose} feature {feature} is {float(tensor[pose, feature])}; "
            "features must be finite"
        )
    converted = tensor.to(dtype)
    bad = (~torch.isfinite(converted)).nonzero()
    if len(bad):
        pose, feature = (int(v) for v in bad[0])
        raise DataError(
            f"pose {pose} feature {feature} is {float(tensor[pose, feature]):g}, which is "
            f"not finite in {_name(dtype)} (the training dtype); rescale the features or "
            "use dtype=float64"
        )
    return converted.unsqueeze(1)


def _check_properties(entry: dict[str, Any], poses: int) -> dict[str, Tensor] | None:
    """Per-pose numbers of ``properties`` (``{"score": [one per pose]}``; null: none)."""
    if "properties" not in entry:
        return None
    fields = entry["properties"]
    if not isinstance(fields, dict):
        raise DataError(
            f"'properties' must map names to lists of one number per pose; got {fields!r:.60}"
        )
    out = {}
    for name, values in fields.items():
        if not isinstance(values, list) or len(values) != poses:
            raise DataError(
                f"properties[{name!r}] must be a list of {poses} numbers (one per pose, "
                f"null for none); got {values!r:.60}"
            )
        if any(isinstance(v, bool) or not isinstance(v, int | float | None) for v in values):
            raise DataError(f"properties[{name!r}] holds something other than numbers")
        numbers = [math.nan if v is None else v for v in values]
        out[name] = torch.tensor(numbers, dtype=torch.float64)
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compound(
    index: int,
    entry: Any,
    features: int | None,
    dtype: torch.dtype,
    values: bool = True,
    targets: Sequence[str] = (),
) -> Compound:
    if not isinstance(entry, dict):
        raise DataError(f"must be a mapping with 'value' and 'poses'; got {entry!r:.60}")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise DataError(f"unknown key(s) {unknown}; a compound has {', '.join(_KEYS)}")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise DataError(f"'name' must be a string; got {name!r}")
    if targets:
        value = torch.tensor(_check_values(entry, targets, values), dtype=torch.float64)
    else:
        number = _check_value(entry) if values or "value" in entry else math.nan
        value = torch.tensor(number, dtype=torch.float64)
    target = value.to(dtype)
    overflow = (value.isfinite() & ~target.isfinite()).nonzero()
    if len(overflow):
        raise DataError(
            f"'value' is {float(value.reshape(-1)[overflow[0]]):g}, which is not finite in "
            f"{_name(dtype)} (the training dtype); rescale the values or use dtype=float64"
        )
    poses = _check_poses(entry, features, dtype)
    properties = _check_properties(entry, len(poses))
    return Compound(poses=poses, target=target, name=name, properties=properties)


def load_compounds(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    values: bool = True,
    targets: Sequence[str] = (),
) -> list[Compound]:
    """Read a user's compounds from a JSON file (the format is in ``docs/cli.md``).

    The file holds ``{"compounds": [{"name": ..., "value": ..., "poses": [...]}, ...]}``:
    per compound an optional name, the measured value (a number) and a non-empty list of
    poses, each a list of the same number of features in every compound. With
    ``values=False`` (compounds to predict) a compound may have no value; its target is
    then NaN. With several ``targets`` (a list ``reader.target``) ``value`` maps each
    target's name to a number or null (``{"pic50_a": 6.1, "pic50_b": null}``), the
    target is ``(d,)``, NaN where missing, and each name must appear in some compound.
    An optional ``"properties": {"score": [...]}`` gives per-pose numbers (one
    per pose, ``null`` for none), the pose fields of ``prior.field`` and ``mask.field``.

    Returns
    -------
    list of Compound
        Poses of shape ``(N, 1, F)`` and a 0-d target, in the file's order.

    Raises
    ------
    DataError
        One line naming the file, the compound (index and name) and the problem: no
        poses, a missing or non-numeric value, features of another size, a NaN or
        infinity, an unknown key, fewer than two compounds, a duplicate name.
    """
    path = Path(path)
    data = _read_json(path)
    entries = data.get("compounds") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{str(path)!r}: expected a JSON object with a 'compounds' list")
    if len(entries) < 2:
        raise DataError(f"{str(path)!r}: has {len(entries)} compound(s); training needs 2")
    compounds: list[Compound] = []
    names: dict[str, int] = {}
    for index, entry in enumerate(entries):
        first = compounds[0].poses if compounds else None
        features = first.shape[-1] if isinstance(first, Tensor) else None
        try:
            compound = _compound(index, entry, features, dtype, values, targets)
            if compound.name is not None and compound.name in names:
                raise DataError(f"has the same name as compounds[{names[compound.name]}]")
        except DataError as exc:
            raise DataError(f"{str(path)!r}: {_label(index, entry)}: {exc}") from None
        if compound.name is not None:
            names[compound.name] = index
        compounds.append(compound)
    _every_target_given(path, entries, compounds, targets, values)
    return compounds


def _every_target_given(
    path: Path,
    entries: list[Any],
    compounds: list[Compound],
    targets: Sequence[str],
    values: bool,
) -> None:
    """Refuse a target that no compound of the file has a value for (a misspelt name)."""
    if not targets or not values:
        return
    present = torch.stack([c.target for c in compounds]).isfinite().any(dim=0)
    for name, found in zip(targets, present.tolist(), strict=True):
        if not found:
            from combframe.app.config import did_you_mean

            keys = sorted({k for e in entries for k in e.get("value", {})})
            raise DataError(
                f"{str(path)!r}: no compound has a value for the target {name!r}"
                f"{did_you_mean(name, keys)}; the value keys in the file: {', '.join(keys)}"
            )


def split_compounds(
    compounds: Sequence[Compound], test_fraction: float, seed: int
) -> tuple[tuple[Compound, ...], tuple[Compound, ...]]:
    """Hold out ``test_fraction`` of ``compounds``, drawn with ``seed``; both keep file order.

    Returns
    -------
    tuple
        ``(train, test)``, each with at least one compound.
    """
    n_test = _n_test(test_fraction, len(compounds))
    perm = torch.randperm(len(compounds), generator=torch.Generator().manual_seed(seed))
    held_out = set(perm[:n_test].tolist())
    train = tuple(c for i, c in enumerate(compounds) if i not in held_out)
    test = tuple(c for i, c in enumerate(compounds) if i in held_out)
    return train, test
