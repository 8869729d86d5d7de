"""``combframe train --compare`` and ``--seeds``: one run per value of one config key.

:func:`parse_compare` reads ``max,mean`` or ``KEY=V1,V2,...``; :func:`compare` checks
every variant and reads each distinct data set before the first run, trains them into
subfolders of one run folder and writes ``compare.json`` with the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from combframe.app.building import check_config
from combframe.app.checkpoint import write_status
from combframe.app.config import (
    SYNTHETIC_KEYS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_validation_error,
)
from combframe.app.data import Dataset
from combframe.app.distributed import Ranks
from combframe.app.loading import load_data
from combframe.app.runs import RunResult, claimed_run_dir
from combframe.app.train import run_training

__all__ = [
    "compare",
    "parse_compare",
]


def parse_compare(text: str) -> tuple[str, list[str]]:
    """Split ``--compare``: ``max,mean`` or ``KEY=V1,V2,...``; return the key and values.

    Raises
    ------
    ConfigError
        If no value is given.
    """
    key, sep, values = text.partition("=")
    if not sep:
        key, values = "combination.name", text
    cleaned = [v.strip() for v in values.split(",") if v.strip()]
    if not key.strip() or not cleaned:
        raise ConfigError(
            "--compare: give combination names (max,mean) or KEY=V1,V2,... "
            f"(strategy=store,stream); got {text!r}"
        )
    return key.strip(), cleaned


def compare(
    config: TrainConfig,
    values: Sequence[str],
    *,
    key: str = "combination.name",
    progress: bool = True,
    write: bool = True,
    stream: TextIO | None = None,
    ranks: Ranks | None = None,
) -> tuple[list[RunResult], Path | None]:
    """Train once per value of ``key``, everything else as in ``config``.

    ``key`` is a dotted config key, as in an override. For ``combination.name``, a name
    equal to the configured combination's keeps the configured parameters; the others
    use their defaults. Runs go to subfolders of one run folder, next to a
    ``compare.json`` with the table.

    Raises
    ------
    ConfigError
        If a value is invalid, not installed or its data cannot be read, before any run.
    """
    ranks = ranks or Ranks()
    configs = _compare_configs(config, key, values)
    datasets: dict[str, Dataset] = {}
    for cfg in configs:  # refuse before the first run, not after it
        check_config(cfg, ranks)
        if _data_key(cfg) not in datasets:
            datasets[_data_key(cfg)] = load_data(cfg)
    runs = [
        (cfg, datasets[_data_key(cfg)], f"{key}={value}")
        for cfg, value in zip(configs, values, strict=True)
    ]
    if not write:
        results = [run_training(cfg, data, ranks, None, progress, stream) for cfg, data, _ in runs]
        return [_labelled(r, label) for r, (_, _, label) in zip(results, runs, strict=True)], None
    with claimed_run_dir(config, ranks) as top:
        results = []
        for i, (cfg, data, label) in enumerate(runs):
            leaf = label.partition("=")[2].replace("/", "_").replace("\\", "_")
            folder = None if top is None else top / f"{i + 1}-{leaf}"
            if folder is not None:
                folder.mkdir()
                write_status(folder, "running")
            with claimed_run_dir(cfg, ranks, existing=folder):  # marks a failed run
                result = run_training(cfg, data, ranks, folder, progress, stream)
            results.append(_labelled(result, label))
        if top is not None:
            _write_table(top, results)
            write_status(top, "completed")
    return results, top


def _labelled(result: RunResult, label: str) -> RunResult:
    result.label = label
    return result


def _data_key(config: TrainConfig) -> str:
    """Return the settings that make the data of a run, as one string."""
    fields = ("data", "reader", "dtype", "seed", "test_fraction", *SYNTHETIC_KEYS)
    return json.dumps(config.model_dump(mode="json", include=set(fields)), sort_keys=True)


def _compare_configs(config: TrainConfig, key: str, values: Sequence[str]) -> list[TrainConfig]:
    base = config.model_dump(mode="json")
    configs = []
    for value in values:
        override = f"{key}={value}"
        try:
            data = apply_overrides(base, [override])
            configs.append(TrainConfig.model_validate(data))
        except ConfigError as exc:
            raise ConfigError(f"--compare {override}: {exc}") from None
        except ValidationError as exc:
            known = list(TrainConfig.model_fields)
            error = format_validation_error(exc, known_fields=known)
            raise ConfigError(f"--compare {override}: {error}") from None
    return configs


def _write_table(top: Path, results: Sequence[RunResult]) -> None:
    table = [
        {
            "run": r.label,
            "combination": r.combination,
            "test": r.metrics["test"],
            "run_dir": str(r.run_dir),
        }
        for r in results
    ]
    (top / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
