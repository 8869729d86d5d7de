"""``combframe train --compare`` and ``--seeds``: one run per value of one config key.

:func:`parse_compare` reads ``max,mean`` or ``KEY=V1,V2,...``; :func:`compare` checks
every variant and reads each distinct data set before the first run, trains them into
subfolders of one run folder and writes ``compare.json`` with the table. The folder's
``runs.json``, written before the first run, is its plan: :func:`resume_compare`
(``combframe train --resume FOLDER``) finishes the runs of an interrupted folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from combframe.app.building import check_config
from combframe.app.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    atomic_write,
    read_status,
    write_status,
)
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
from combframe.app.runs import RunInterruptedError, RunResult, claimed_run_dir
from combframe.app.train import resume, run_training

__all__ = [
    "PLAN",
    "compare",
    "parse_compare",
    "read_plan",
    "resume_compare",
]

#: The plan of a ``--compare`` or ``--seeds`` folder's runs, written before the first.
PLAN = "runs.json"


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
        names = _folder_names(key, values)
        if top is not None:
            plan = {
                "key": key,
                "values": list(values),
                "folders": names,
                "config": config.model_dump(mode="json"),
            }
            atomic_write(top / PLAN, (json.dumps(plan, indent=2) + "\n").encode())
        return _train_all(top, runs, names, ranks, progress, stream), top


def resume_compare(
    top: Path, *, progress: bool = True, stream: TextIO | None = None, ranks: Ranks | None = None
) -> tuple[list[RunResult], Path]:
    """Finish the runs of the ``--compare`` or ``--seeds`` folder ``top``, then its table.

    Completed runs are read back from their ``metrics.json``, interrupted ones continue
    from their checkpoints, and runs not started yet are trained; then ``compare.json``
    is written and ``top`` marked completed.

    Raises
    ------
    CheckpointError
        If ``top`` has no plan of its runs (``runs.json``) or has already completed.
    """
    ranks = ranks or Ranks()
    plan = read_plan(top)
    status = read_status(top)
    if status.get("state") in ("completed", "failed"):
        raise CheckpointError(
            f"{str(top)!r} holds runs that {status['state']}"
            + (f" ({status['reason']})" if "reason" in status else "")
            + "; only an interrupted folder is resumed: train it again into a new folder "
            f"with --config {str(top / 'config.yaml')!r}"
        )
    config = TrainConfig.model_validate(plan["config"])
    key, values = str(plan["key"]), [str(v) for v in plan["values"]]
    configs = _compare_configs(config, key, values)
    for cfg in configs:
        check_config(cfg, ranks)
    runs = [(cfg, None, f"{key}={value}") for cfg, value in zip(configs, values, strict=True)]
    with claimed_run_dir(config, ranks, existing=top) as claimed:
        if claimed is not None:
            write_status(claimed, "running")
        return _train_all(top, runs, plan["folders"], ranks, progress, stream), top


def read_plan(top: Path) -> dict[str, Any]:
    """Return the plan of the runs of a ``--compare`` or ``--seeds`` folder (``runs.json``).

    Raises
    ------
    CheckpointError
        If ``top`` holds no readable plan.
    """
    try:
        plan: dict[str, Any] = json.loads((top / PLAN).read_text(encoding="utf-8"))
        if not isinstance(plan.get("folders"), list):
            raise ValueError("no list of folders")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{str(top)!r} holds no readable {PLAN} (the plan of its runs): {exc}"
        ) from None
    return plan


def _folder_names(key: str, values: Sequence[str]) -> list[str]:
    """Name the run folders: ``seed-0``, ``seed-1``, ... for seeds, ``1-max``, ... otherwise."""
    if key == "seed" and len(set(values)) == len(values):
        return [f"seed-{v}" for v in values]
    return [f"{i + 1}-{v.replace('/', '_').replace(chr(92), '_')}" for i, v in enumerate(values)]


def _train_all(
    top: Path | None,
    runs: Sequence[tuple[TrainConfig, Dataset | None, str]],
    names: Sequence[str],
    ranks: Ranks,
    progress: bool,
    stream: TextIO | None,
) -> list[RunResult]:
    """Train (or resume, or read back) each run into its subfolder; write the table."""
    results = []
    for (cfg, data, label), name in zip(runs, names, strict=True):
        folder = None if top is None else top / name
        result = _finished(top / name, label) if top is not None else None
        try:
            result = result or _one_run(cfg, data, folder, ranks, progress, stream)
        except RunInterruptedError as exc:
            if top is None:
                raise
            where = str(exc).partition("; continue with")[0]
            raise RunInterruptedError(
                f"{where} (run {label}); continue with `combframe train --resume {top}` "
                "(it finishes every run of the folder)",
                exc.signum,
                top,
            ) from None
        results.append(_labelled(result, label))
    if top is not None and ranks.main:
        _write_table(top, results)
        write_status(top, "completed")
    return results


def _finished(folder: Path, label: str) -> RunResult | None:
    """Return the result of a completed run folder, read back; None if not completed."""
    if read_status(folder).get("state") != "completed":
        return None
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return RunResult(metrics["combination"], metrics, folder, label=label)


def _one_run(
    cfg: TrainConfig,
    data: Dataset | None,
    folder: Path | None,
    ranks: Ranks,
    progress: bool,
    stream: TextIO | None,
) -> RunResult:
    """Train one run into ``folder``: from its checkpoint if it has one, else from the start."""
    if folder is not None and (folder / CHECKPOINT).is_file():
        return resume(folder, progress=progress, stream=stream, ranks=ranks)
    if folder is not None and ranks.main:
        folder.mkdir(exist_ok=True)
        write_status(folder, "running")
    data = data if data is not None else load_data(cfg)
    with claimed_run_dir(cfg, ranks, existing=folder):  # marks a failed run
        return run_training(cfg, data, ranks, folder, progress, stream)


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
