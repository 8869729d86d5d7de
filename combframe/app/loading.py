"""The compounds of a run, in every input format, split: :func:`load_data`.

The built-in synthetic set (:mod:`combframe.app.data`), a JSON file of feature vectors,
or molecules (:mod:`combframe.app.readers`): training, ``combframe predict`` and
``--compare`` all read their data here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from combframe.app.config import ConfigError, TrainConfig
from combframe.app.data import (
    Compound,
    DataError,
    Dataset,
    load_compounds,
    make_dataset,
    split_compounds,
)
from combframe.app.priors import with_priors
from combframe.app.readers import BUILT_IN, is_molecular, read_molecules

__all__ = [
    "dtype_of",
    "load_data",
]


def dtype_of(config: TrainConfig) -> torch.dtype:
    """Return the floating dtype of a run's data and model (``config.dtype``)."""
    return torch.float64 if config.dtype == "float64" else torch.float32


def load_data(config: TrainConfig, *, for_prediction: bool = False) -> Dataset:
    """Load the compounds of a run, split: the one entry point for every input format.

    The built-in synthetic set (``data`` unset), a JSON file of feature vectors, or
    molecules (a built-in real set by name, an SDF, SMILES, a manifest; see
    :mod:`combframe.app.readers` and ``docs/data.md``).

    The one reader of a run's data: ``combframe predict`` calls it too, with
    ``for_prediction=True``, to get every compound in ``train`` (the file's order), none
    held out, and compounds without a value allowed (their target is NaN).

    With ``prior.field`` or ``mask.field``, every compound's ``prior`` is set from its
    pose fields (:func:`combframe.app.priors.with_priors`).

    Raises
    ------
    ConfigError
        ``data: <file>: <record> (<compound>): <problem>`` for input that cannot be used;
        ``prior.field: ...`` or ``mask.field: ...`` for pose fields that cannot be.
    """
    return _load(config, for_prediction)


def _split(
    config: TrainConfig,
    compounds: Sequence[Compound],
    for_prediction: bool,
    source: str,
    **extra: Any,
) -> Dataset:
    """Set the priors of ``compounds`` (file order), then split them (or keep all)."""
    kept, skipped = with_priors(config, compounds, source)
    extra["skipped"] = (*extra.get("skipped", ()), *skipped)
    if skipped and len(kept) < (1 if for_prediction else 2):
        what = "nothing to predict" if for_prediction else "training needs 2"
        raise ConfigError(
            f"reader.skip_invalid: {len(kept)} usable compound(s) left; {what} "
            f"(the first left out: {skipped[0]})"
        )
    if for_prediction:
        return Dataset(kept, (), source=source, **extra)
    train_set, test_set = split_compounds(kept, config.test_fraction, config.seed)
    return Dataset(train_set, test_set, source=source, **extra)


def _load(config: TrainConfig, for_prediction: bool) -> Dataset:
    """Read and split the compounds of :func:`load_data`."""
    names = config.reader.targets
    if names and config.data is None:
        raise ConfigError(
            f"reader.target: several targets {list(names)} need data=<file> holding them; "
            "the built-in synthetic set has one value per compound"
        )
    if is_molecular(config.data):
        return _molecules(config, for_prediction)
    if config.data is not None and not config.data.suffix and not config.data.exists():
        raise ConfigError(
            f"data: {str(config.data)!r} is neither a file nor a built-in set "
            f"({', '.join(BUILT_IN)})"
        )
    if config.data is None:
        built_in = make_dataset(
            n_compounds=config.compounds,
            poses_per_compound=config.poses_per_compound,
            features=config.features,
            pose_spread=config.pose_spread,
            noise=config.noise,
            test_fraction=config.test_fraction,
            seed=config.seed,
            dtype=dtype_of(config),
        )
        with_priors(config, (), "built-in")  # refuses pose fields
        if for_prediction:
            every = (*built_in.train, *built_in.test)
            return Dataset(every, (), built_in.features, "built-in")
        return Dataset(built_in.train, built_in.test, built_in.features, "built-in")
    try:
        compounds = load_compounds(
            config.data, dtype=dtype_of(config), values=not for_prediction, targets=names
        )
    except DataError as exc:
        raise ConfigError(f"{exc.key}: {exc}") from None
    first = compounds[0].poses
    features = int(first.shape[-1]) if isinstance(first, Tensor) else 0
    return _split(
        config, compounds, for_prediction, str(config.data), features=features, targets=names
    )


def _molecules(config: TrainConfig, for_prediction: bool) -> Dataset:
    try:
        read = read_molecules(
            str(config.data), config.reader, dtype_of(config), values=not for_prediction
        )
    except DataError as exc:
        raise ConfigError(f"{exc.key}: {exc}") from None
    return _split(
        config,
        read.compounds,
        for_prediction,
        read.source,
        features=0,
        kind="molecules",
        skipped=read.skipped,
        targets=config.reader.targets,
    )
