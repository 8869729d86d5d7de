"""``combframe train`` on the command line: its runs, from the arguments, and its report.

One run, ``--compare`` or ``--seeds`` (one run per value), or ``--resume``; then the
held-out metrics with their intervals, the notes, and a table of the runs compared.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

from combframe.app.console import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    count,
    describe,
    describe_learned,
    fmt,
    say,
)

__all__ = ["cmd_train"]


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``combframe train``; return the exit status (usage errors raise)."""
    from combframe.app import distributed
    from combframe.app.building import check_config
    from combframe.app.checkpoint import CheckpointError
    from combframe.app.config import ConfigError, load_config
    from combframe.app.runs import RunInterruptedError, RunWriteError, name_taken_note
    from combframe.app.train import TrainingDivergedError

    ranks = distributed.from_environment()
    try:
        if args.resume is not None:
            results, folder = _resume(args, ranks)
        else:
            config = load_config(args.config, args.overrides)
            device = check_config(config, ranks)
            taken = name_taken_note(config)
            if taken is not None:
                say(f"note: {taken}")
            variants = _variants(args, config)
            results, folder = _train_runs(config, variants, device, ranks, not args.no_progress)
    except (ConfigError, CheckpointError) as exc:
        raise UsageError(str(exc)) from None
    except TrainingDivergedError as exc:
        say(f"combframe train: {exc}", every_rank=not exc.same_on_every_rank)
        return EXIT_FAILED
    except RunInterruptedError as exc:
        say(f"combframe train: {exc}")
        return 128 + exc.signum
    except RunWriteError as exc:
        if ranks.main:
            _report([exc.result], None)
        say(f"combframe train: error: {exc}")
        return EXIT_FAILED
    if ranks.main:
        _report(results, folder)
    return EXIT_OK


def _variants(args: argparse.Namespace, config: Any) -> tuple[str, list[str]] | None:
    """Return ``--compare``'s key and values, or ``--seeds`` as a comparison of seeds."""
    from combframe.app.compare import parse_compare

    if args.seeds is not None and args.compare is not None:
        raise UsageError("--seeds and --compare cannot be combined; give one of them")
    if args.seeds is not None:
        return "seed", [str(config.seed + i) for i in range(args.seeds)]
    if args.compare is None:
        return None
    if len(args.compare) > 1:
        raise UsageError(
            f"--compare is given {len(args.compare)} times ({', '.join(args.compare)}); give "
            "it once, with one key and its values (epochs=1,2,3)"
        )
    key, values = parse_compare(args.compare[0])
    for item in args.overrides:
        other = item.partition("=")[0].strip()
        if other == key or other.startswith(f"{key}.") or key.startswith(f"{other}."):
            raise UsageError(
                f"--compare varies {key}, and the override {item!r} sets it too; give its "
                f"values in --compare only (--compare {key}=V1,V2,...)"
            )
    return key, values


def _resume(args: argparse.Namespace, ranks: Any) -> tuple[list[Any], Any]:
    """Continue the run folder ``--resume RUN``: one run, or the runs of --compare/--seeds."""
    from pathlib import Path

    from combframe.app import distributed
    from combframe.app.building import check_config
    from combframe.app.train import resume

    if args.overrides or args.config or args.compare or args.seeds:
        raise UsageError(
            "--resume continues a run with its own config; give no --config, --compare, "
            "--seeds or KEY=VALUE with it"
        )
    folder = Path(args.resume)
    from combframe.app.checkpoint import load_checkpoint
    from combframe.app.compare import PLAN, read_plan, resume_compare
    from combframe.app.config import TrainConfig

    plan = (folder / PLAN).is_file()
    state = read_plan(folder) if plan else load_checkpoint(folder)
    device = check_config(TrainConfig.model_validate(state["config"]), ranks)
    with distributed.process_group(ranks, device) as joined:
        if plan:
            return resume_compare(folder, progress=not args.no_progress, ranks=joined)
        result = resume(folder, progress=not args.no_progress, ranks=joined)
    return [result], result.run_dir


def _train_runs(
    config: Any, variants: tuple[str, list[str]] | None, device: Any, ranks: Any, progress: bool
) -> tuple[list[Any], Any]:
    """Train once, or once per ``--compare`` value, in the process group under torchrun."""
    from combframe.app import distributed
    from combframe.app.compare import compare
    from combframe.app.loading import load_data
    from combframe.app.train import train

    if variants is None:
        data = load_data(config)  # a bad compounds file is refused before the group forms
        with distributed.process_group(ranks, device) as joined:
            result = train(config, progress=progress, data=data, ranks=joined)
        return [result], result.run_dir
    key, values = variants
    with distributed.process_group(ranks, device) as joined:
        return compare(config, values, key=key, progress=progress, ranks=joined)


def _report(results: Sequence[Any], folder: Any) -> None:
    from combframe.app.memory import format_bytes

    if len(results) == 1:
        m = results[0].metrics
        test = m["test"]
        unit = " kcal/mol" if m["data"]["source"] == "built-in" else ""
        processes = f" ({m['processes']} processes)" if m["processes"] > 1 else ""
        print(f"combination  {describe(m['combination'])}")
        chosen = m.get("strategy_chosen")
        picked = f" (chose {chosen['name']}: {chosen['reason']})" if chosen else ""
        print(f"strategy     {m['strategy']}{picked} on {m['device']}{processes}")
        _held_out_lines(test, unit)
        _epochs_lines(m)
        print(f"time/epoch   {fmt(m['time_per_epoch_s'], '.2f')} s")
        rss = m["process_peak_rss_mb"]
        rss_text = f"; process peak RSS {rss:.0f} MiB" if rss is not None else ""
        print(
            f"peak memory  {format_bytes(m['peak_memory_bytes'])}: {m['peak_memory_kind']}"
            f"{rss_text}"
        )
    else:
        _print_table(results)
    for r in results:
        label = r.label
        if label.startswith("combination.name="):
            label = describe(r.combination)
        label = f"{label}: " if label else ""
        for note in r.notes:
            print(f"note: {label}{note}", file=sys.stderr)
    if folder is not None:
        print(f"run folder   {folder}")


def _held_out_lines(test: dict[str, Any], unit: str) -> None:
    """Print the held-out metrics and their intervals; several targets: a row per target."""

    def metrics(row: dict[str, Any]) -> str:
        return (
            f"RMSE {fmt(row['rmse'])}{unit}   MAE {fmt(row['mae'])}   Pearson "
            f"{fmt(row['pearson'])}   Spearman {fmt(row['spearman'])}   Kendall "
            f"{fmt(row['kendall'])}   ({count(row['compounds'], 'compound')})"
        )

    targets = test.get("targets")
    if not targets:
        print(f"held-out     {metrics(test)}")
        print(f"95% CI       {_intervals(test)}")
        return
    print(f"held-out     mean of {len(targets)} targets: {metrics(test)}")
    for name, row in targets.items():
        print(f"  {name}: {metrics(row)}")
        print(f"  {' ' * len(name)}  95% CI {_intervals(row)}")


def _epochs_lines(m: dict[str, Any]) -> None:
    """Say which model the held-out metrics are of, the best epoch, and an early stop."""
    val, trained = m["validation"], m["epochs_trained"]
    if m["stopped_early"]:
        wait = trained - val["best_epoch"]
        print(
            f"epochs       stopped early at epoch {trained}: no lower validation RMSE in the "
            f"{wait} epochs after epoch {val['best_epoch']} (patience={wait})"
        )
    if val:
        print(
            f"validation   RMSE {fmt(val['final_rmse'])} at epoch {trained}: the run's model "
            "(model.safetensors), whose held-out metrics are above; lowest "
            f"{fmt(val['best_rmse'])} at epoch {val['best_epoch']} (best.safetensors, "
            "predict --best)"
        )


def _intervals(test: dict[str, Any]) -> str:
    """Return the bootstrap 95% intervals of the held-out metrics, on one line."""
    names = {"rmse": "RMSE", "mae": "MAE", "pearson": "Pearson", "spearman": "Spearman"}
    names["kendall"] = "Kendall"
    cells = []
    for key, label in names.items():
        ci = test.get("ci95", {}).get(key)
        span = "n/a" if ci is None or test[key] is None else f"{fmt(ci[0])} to {fmt(ci[1])}"
        cells.append(f"{label} {span}")
    return "   ".join(cells)


def _row_label(result: Any, by_name: bool) -> str:
    """Return a table row's first cell: the combination, or the label and learned values.

    ``--compare combination.name`` names the combination; other runs give their label
    and the values their combination learned (``seed=1 kT=0.98559 (learned)``).
    """
    if by_name:
        return describe(result.metrics["combination"])
    learned = describe_learned(result.metrics["combination"])
    return f"{result.label} {learned}" if learned else str(result.label)


def _print_table(results: Sequence[Any]) -> None:
    from combframe.app.memory import format_bytes

    by_name = all(r.label.startswith("combination.name=") for r in results)
    validated = all(r.metrics.get("validation") for r in results)
    rows = [
        (
            _row_label(r, by_name),
            *([fmt(r.metrics["validation"]["final_rmse"])] if validated else []),
            fmt(r.metrics["test"]["rmse"]),
            fmt(r.metrics["test"]["pearson"]),
            fmt(r.metrics["test"]["spearman"]),
            fmt(r.metrics["time_per_epoch_s"], ".2f"),
            format_bytes(r.metrics["peak_memory_bytes"]),
        )
        for r in results
    ]
    # Chosen on validation, as printed, so that runs tying at three decimals share the *.
    printed = [float(row[1]) if validated and row[1] != "n/a" else math.inf for row in rows]
    first = "combination" if by_name else "run"
    header = (first, *(["val RMSE"] if validated else []), "RMSE", "Pearson", "Spearman")
    header += ("s/epoch", "step memory")
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if c == 0 else v.rjust(w)
            for c, (v, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(f"  {line(header)}")
    seeds = all(r.label.startswith("seed=") for r in results)
    for i, row in enumerate(rows):
        chosen = validated and not seeds and printed[i] == min(printed)
        print(f"{'*' if chosen else ' '} {line(row)}")
    print("held-out metrics of compound-level predictions (each measured once, never chosen on)")
    if validated:
        print("val RMSE and held-out metrics: of each run's final model (model.safetensors)")
    if seeds:
        print(
            "the runs differ only in their seed: together they are an ensemble "
            "(`combframe predict` on the run folder gives their mean and std), none is chosen"
        )
    elif validated:
        print("* lowest validation RMSE: the run chosen on validation")
    else:
        print("no run is chosen: set val_fraction (e.g. val_fraction=0.2) to choose on validation")
    print(f"step memory: {results[0].metrics['peak_memory_kind']}")
