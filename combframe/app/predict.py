r"""Saved models back: :func:`load`, predictions for compounds, ensembles, pose weights.

:func:`load` rebuilds a run's model from its folder: the network through
:func:`combframe.app.train.build_model` (the one place a run's network is made) from the
config and ``network`` entry of ``model.json``, then the weights of
``model.safetensors``, checked against their sha256. It gives the same predictions on
any device and under any default dtype as the run had, because the dtype is the run's
(``config.dtype``), not the process's default.

:func:`predict` runs one or more models over compounds and returns, per compound, the
mean prediction over the models and their standard deviation (an ensemble, e.g. the
runs of ``combframe train --seeds 5``), and per pose its prediction :math:`y_i` and its
weight in the combination, :math:`\partial G / \partial y_i`: for the smooth minimum
nearly 1 for the pose the model picked and 0 for the others, :math:`1/N` for the mean.
The weights are :meth:`combframe.MultiPoseModel.pose_weights`: autograd on the small
vector of per-pose predictions, never through the network.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

import combframe
from combframe.app.building import build_model
from combframe.app.checkpoint import CheckpointError, atomic_write, read_status
from combframe.app.config import (
    SYNTHETIC_KEYS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_validation_error,
)
from combframe.app.data import Compound, Dataset
from combframe.app.loading import load_data
from combframe.app.priors import log_priors
from combframe.app.saved import read_model

__all__ = [
    "PREDICT_KEYS",
    "Predictions",
    "load",
    "predict",
    "PredictedFile",
    "predict_file",
    "run_folders",
    "write_csv",
]

#: Compounds per forward call.
_BATCH = 64


def load(
    run_dir: str | Path, *, device: str | torch.device = "cpu", which: str = "final"
) -> combframe.MultiPoseModel:
    """Return the trained model of a run folder, ready to predict (in eval mode).

    Parameters
    ----------
    run_dir
        A run folder written by ``combframe train``.
    device
        Where the model goes (``"cpu"``, ``"cuda"``, ...).
    which
        ``"final"`` (the model after the last epoch) or ``"best"`` (the epoch with the
        lowest validation RMSE; runs with ``val_fraction > 0``).

    Raises
    ------
    CheckpointError
        If the folder holds no such model, its weights fail their sha256 check, the
        config names a combination that is not installed, or the weights (with the
        combination's settings saved next to them) do not fit the model the config
        describes.
    """
    folder = Path(run_dir)
    state, meta = read_model(folder, which)
    try:
        config = TrainConfig.model_validate(meta["config"])
    except ValidationError as exc:
        raise CheckpointError(
            f"{str(folder)!r}: the saved config cannot be used here: {format_validation_error(exc)}"
        ) from None
    model = build_model(config, **meta["network"])
    try:
        model.load_state_dict(state)
    except (combframe.CombinationError, RuntimeError) as exc:
        raise CheckpointError(
            f"{str(folder)!r}: the weights do not fit the model its config describes: {exc}"
        ) from None
    return model.to(device).eval()


def run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """Expand each path: a run folder, or a ``--compare``/``--seeds`` folder of runs.

    Raises
    ------
    CheckpointError
        For a ``--compare``/``--seeds`` folder whose runs have not all finished.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        table = path / "compare.json"
        if table.is_file():
            out += [path / Path(row["run_dir"]).name for row in json.loads(table.read_text())]
        elif (path / "runs.json").is_file():
            raise CheckpointError(
                f"{str(path)!r} holds runs of --compare or --seeds that have not all "
                f"finished ({read_status(path).get('state', 'unknown')}); finish them with "
                f"`combframe train --resume {path}`"
            )
        else:
            out.append(path)
    return out


@dataclass(frozen=True)
class PredictedFile:
    """The compounds of a file and their predictions (:func:`predict_file`).

    Attributes
    ----------
    compounds
        Every compound, in the file's order.
    predictions
        Their predictions; row ``i`` is compound ``i``.
    skipped
        What ``reader.skip_invalid`` left out, one line each.
    """

    compounds: tuple[Compound, ...]
    predictions: Predictions
    skipped: tuple[str, ...] = ()


#: Config keys that choose the compounds to predict (with ``reader.*`` and the synthetic
#: set's keys); the model's settings are the run's.
PREDICT_KEYS = ("data", "seed", "test_fraction")


def predict_file(
    runs: str | Path | Sequence[str | Path],
    data: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    which: str = "final",
    device: str | torch.device = "cpu",
) -> PredictedFile:
    """Predict every compound of a file, in the file's order, with one run or an ensemble.

    Parameters
    ----------
    runs
        A run folder, a ``--compare``/``--seeds`` folder (its runs), or several folders;
        more than one model gives the ensemble's mean and standard deviation.
    data
        The compounds file (or built-in set name); default: the run's own data. Its
        compounds need no value (their target is NaN).
    overrides
        More ``KEY=VALUE`` settings that choose the compounds (``reader.*``, ``seed``,
        ...), as on the command line.
    which
        ``"final"`` or ``"best"`` (see :func:`load`); the config that reads the data is
        that of the model used.
    device
        Where the models run.

    Returns
    -------
    PredictedFile
        The compounds, in the file's order (none held out), their :class:`Predictions`
        (row ``i`` is compound ``i``) and what ``reader.skip_invalid`` left out.

    Raises
    ------
    ConfigError
        If a key does not choose compounds, or the data does not fit the models.
    CheckpointError
        If a folder holds no usable model.
    """
    folders = run_folders([runs] if isinstance(runs, str | Path) else list(runs))
    if not folders:
        raise ConfigError("runs: give at least one run folder")
    extra = [f"data={data}"] if data is not None else []
    compounds = _compounds(folders[0], which, [*overrides, *extra])
    for folder in folders:
        _check_fits(folder, which, compounds, _priors_of(folders[0], which))
    models = [load(f, device=device, which=which) for f in folders]
    result = predict(models, compounds.train, targets=compounds.targets)
    return PredictedFile(compounds.train, result, compounds.skipped)


def _compounds(folder: Path, which: str, overrides: Sequence[str]) -> Dataset:
    """Read the compounds to predict with the config of ``folder``'s ``which`` model."""
    allowed = (*PREDICT_KEYS, *SYNTHETIC_KEYS)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in allowed and not key.startswith("reader."):
            raise ConfigError(
                f"{key}: predict takes only the keys that choose the compounds "
                f"({', '.join(allowed)}, reader.*); the model's settings are the run's"
            )
    _, meta = read_model(folder, which)
    config = TrainConfig.model_validate(apply_overrides(meta["config"], list(overrides)))
    return load_data(config, for_prediction=True)


def _priors_of(folder: Path, which: str) -> dict[str, object]:
    """Return the ``prior`` and ``mask`` settings of ``folder``'s model (older runs: none)."""
    config = TrainConfig.model_validate(read_model(folder, which)[1]["config"])
    return {"prior": config.prior.model_dump(), "mask": config.mask.model_dump()}


def _check_fits(folder: Path, which: str, data: Dataset, priors: dict[str, object]) -> None:
    """Refuse compounds of another kind, size or targets than the model's, or other priors.

    ``priors``: the settings the compounds were read with (the first model's).
    """
    meta = read_model(folder, which)[1]
    network, targets = meta["network"], meta.get("targets", [])
    if list(data.targets) != list(targets):
        raise ConfigError(
            f"reader.target: the model of {str(folder)!r} predicts "
            f"{targets or 'one value'}; the data name {list(data.targets) or 'one value'} "
            "(leave reader.target as the run had it)"
        )
    kind, features = network.get("kind", "vectors"), network["features"]
    what = {"molecules": "molecules (atoms and their 3D positions)", "vectors": "feature vectors"}
    if kind != data.kind:
        raise ConfigError(
            f"data: the compounds are {what.get(data.kind, data.kind)}; the model of "
            f"{str(folder)!r} was trained on {what.get(kind, kind)}"
        )
    if features != data.features:
        raise ConfigError(
            f"data: the compounds have {data.features} features per pose; the model of "
            f"{str(folder)!r} was trained on {features}"
        )
    if _priors_of(folder, which) != priors:
        raise ConfigError(
            f"runs: the model of {str(folder)!r} was trained with other prior.* or mask.* "
            f"settings than the first run's ({priors}); predict such runs separately"
        )


@dataclass(frozen=True)
class Predictions:
    r"""Predictions of one or more models for a list of compounds.

    Attributes
    ----------
    combined, combined_std
        Per compound, shape ``(C,)``: the mean over the models and their standard
        deviation (0 for one model).
    per_pose, weights
        Per pose of all compounds, flat, shape ``(M,)``: the mean prediction and the mean
        weight :math:`\partial G/\partial y_i` over the models.
    index
        The compound of each pose, shape ``(M,)``.
    models
        How many models were averaged.
    digits
        Significant digits that tell the models' values apart (9 for float32, 17 for
        float64), for writing them as text.
    targets
        The names of several targets: then ``combined``, ``combined_std``,
        ``per_pose`` and ``weights`` have a column per target, ``(C, d)`` and
        ``(M, d)``, and each pose its weight in each target's combined value.
    """

    combined: Tensor
    combined_std: Tensor
    per_pose: Tensor
    weights: Tensor
    index: Tensor
    models: int
    digits: int = 17
    targets: tuple[str, ...] = ()


def _one_model(
    model: combframe.MultiPoseModel, compounds: Sequence[Compound]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return combined, per-pose predictions, pose weights and pose index, float64 on CPU."""
    param = next(model.parameters())
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for start in range(0, len(compounds), _BATCH):
        chunk = compounds[start : start + _BATCH]
        moved = [c.to(param.device, param.dtype) for c in chunk]
        poses, prior = [list(c.poses) for c in moved], log_priors(moved)
        with torch.no_grad():
            out = model(compounds=poses, prior=prior)
        weights = model.pose_weights(out.per_pose, out.index, prior=prior)
        parts.append((out.combined, out.per_pose, weights, out.index + start))
    combined, per_pose, weights, index = (
        torch.cat([p[i] for p in parts]).detach().cpu() for i in range(4)
    )
    return combined.double(), per_pose.double(), weights.double(), index


def predict(
    models: Sequence[combframe.MultiPoseModel],
    compounds: Sequence[Compound],
    *,
    targets: Sequence[str] = (),
) -> Predictions:
    """Predict ``compounds`` with every model of ``models``; average over the models.

    ``targets``: the names of the models' several outputs (each model returns
    ``(b, d)``), written as the columns of :func:`write_csv`.
    """
    if not models or not compounds:
        raise ValueError("predict needs at least one model and one compound")
    runs = [_one_model(m, compounds) for m in models]
    combined = torch.stack([r[0] for r in runs])
    std = combined.std(dim=0) if len(runs) > 1 else torch.zeros_like(combined[0])
    return Predictions(
        combined=combined.mean(dim=0),
        combined_std=std,
        per_pose=torch.stack([r[1] for r in runs]).mean(dim=0),
        weights=torch.stack([r[2] for r in runs]).mean(dim=0),
        index=runs[0][3],
        models=len(runs),
        digits=max(9 if next(m.parameters()).dtype != torch.float64 else 17 for m in models),
        targets=tuple(targets),
    )


def write_csv(
    path: Path, compounds: Sequence[Compound], result: Predictions, *, poses: Path | None = None
) -> None:
    """Write one row per compound to ``path`` and, if given, one row per pose to ``poses``.

    Compound rows: ``index, name, prediction`` (``std`` and ``models`` for an ensemble)
    and ``target`` when any compound has a value (empty for one without), written as
    read (the shortest text of the value in its dtype: ``-6.1``, not ``-6.0999999``).
    Pose rows: ``index, name, pose, prediction, weight``. Several targets: a
    ``prediction_<name>`` column per target (and ``std_<name>``, ``target_<name>``;
    ``weight_<name>`` per pose, or one ``weight`` for a pooling combination, whose
    weight is the pose's share of all targets).
    """
    names = [c.name or "" for c in compounds]
    ends = [f"_{t}" for t in result.targets] or [""]
    values = [[_value_text(v) for v in c.target.reshape(-1)] for c in compounds]
    with_target = any(any(v) for v in values)
    header = ["index", "name", *(f"prediction{e}" for e in ends)]
    header += [*(f"std{e}" for e in ends), "models"] if result.models > 1 else []
    header += [f"target{e}" for e in ends] if with_target else []
    rows = []
    for i, name in enumerate(names):
        row: list[object] = [i, name, *result.combined[i].reshape(-1).tolist()]
        if result.models > 1:
            row += [*result.combined_std[i].reshape(-1).tolist(), result.models]
        row += values[i] if with_target else []
        rows.append(row)
    _write_rows(path, header, rows, result.digits)
    if poses is not None:
        pose_rows: list[list[object]] = []
        counts = [0] * len(compounds)
        width = len(ends)
        per_pose = result.per_pose.reshape(-1, width).tolist()
        weights = result.weights.reshape(len(per_pose), -1).tolist()
        for c, y, w in zip(result.index.tolist(), per_pose, weights, strict=True):
            pose_rows.append([c, names[c], counts[c], *y, *w])
            counts[c] += 1
        header = ["index", "name", "pose", *(f"prediction{e}" for e in ends)]
        pooled = result.weights.dim() == 1  # a pooling combination: one weight for all
        header += ["weight"] if pooled else [f"weight{e}" for e in ends]
        _write_rows(poses, header, pose_rows, result.digits)


def _value_text(value: Tensor) -> str:
    """Return the shortest text that reads back as ``value`` in its dtype; "" for NaN."""
    number = float(value)
    if number != number:  # NaN: a compound without a value
        return ""
    return repr(number) if value.dtype == torch.float64 else str(np.float32(number))


def _write_rows(path: Path, header: list[str], rows: list[list[object]], digits: int) -> None:
    """Write a CSV; floats with ``digits`` significant digits (float32's round trip: 9)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(
        [[f"{v:.{digits}g}" if isinstance(v, float) else v for v in row] for row in rows]
    )
    atomic_write(path, out.getvalue().encode())
