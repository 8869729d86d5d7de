"""The ``combframe`` command line: ``train``, ``list``, ``check`` and ``schema``.

Run ``combframe --help`` or ``combframe <command> --help``; ``docs/cli.md`` describes
every command. Usage errors (a bad config, an unknown combination, a malformed
override) print one line on stderr and exit with status 2; a failed ``check`` exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---- train --------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _describe(combination: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in combination.items() if k != "name")
    return f"{combination['name']}({params})"


def _cmd_train(args: argparse.Namespace) -> int:
    from combframe.app.train import ConfigError, TrainingDivergedError, compare, load_config, train

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    progress = not args.no_progress
    try:
        if args.compare is None:
            result = train(config, progress=progress)
            results = [result]
            folder = result.run_dir
        else:
            results, folder = compare(config, args.compare.split(","), progress=progress)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except TrainingDivergedError as exc:
        print(f"combframe train: {exc}", file=sys.stderr)
        return EXIT_FAILED

    if len(results) == 1:
        m = results[0].metrics
        test = m["test"]
        print(f"combination  {_describe(m['combination'])}")
        print(f"strategy     {m['strategy']} on {m['device']}")
        print(
            f"held-out     RMSE {_fmt(test['rmse'])} kcal/mol   Pearson {_fmt(test['pearson'])}"
            f"   Spearman {_fmt(test['spearman'])}   ({test['compounds']} compounds)"
        )
        print(
            f"time/epoch   {_fmt(m['time_per_epoch_s'], '.2f')} s   peak memory "
            f"{_fmt(m['peak_memory_mb'], '.0f')} MiB ({m['peak_memory_kind']})"
        )
    else:
        _print_table(results)
    for note in (n for r in results for n in r.notes):
        print(f"note: {note}", file=sys.stderr)
    if folder is not None:
        print(f"run folder   {folder}")
    return EXIT_OK


def _print_table(results: Sequence[Any]) -> None:
    rows = [
        (
            _describe(r.metrics["combination"]),
            _fmt(r.metrics["test"]["rmse"]),
            _fmt(r.metrics["test"]["pearson"]),
            _fmt(r.metrics["test"]["spearman"]),
            _fmt(r.metrics["time_per_epoch_s"], ".2f"),
            _fmt(r.metrics["peak_memory_mb"], ".0f"),
        )
        for r in results
    ]
    best = min(range(len(results)), key=lambda i: results[i].metrics["test"]["rmse"])
    header = ("combination", "RMSE", "Pearson", "Spearman", "s/epoch", "peak MiB")
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
    line = "  ".join(
        h.ljust(w) if c == 0 else h.rjust(w)
        for c, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(f"  {line}")
    for i, row in enumerate(rows):
        cells = "  ".join(
            v.ljust(w) if c == 0 else v.rjust(w)
            for c, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        print(f"{'*' if i == best else ' '} {cells}")
    print("held-out metrics of compound-level predictions; * lowest RMSE")


# ---- list ---------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not isinstance(getattr(obj, f.name), type)
        }
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return repr(obj)


def _cmd_list(args: argparse.Namespace) -> int:
    import warnings

    import combframe

    with warnings.catch_warnings():
        # Load failures are part of the listing below; do not also warn about them.
        warnings.simplefilter("ignore", combframe.PluginWarning)
        infos = combframe.describe_combinations()
        errors = combframe.plugin_errors()
    if args.json:
        out = {"combinations": _jsonable(infos), "errors": _jsonable(errors)}
        print(json.dumps(out, indent=2))
        return EXIT_OK
    if not infos:
        print("no combinations installed")
    for info in infos:
        origin = info.distribution or "not from a distribution"
        if info.version:
            origin += f" {info.version}"
        aliases = f" (aliases: {', '.join(info.aliases)})" if info.aliases else ""
        stream = "yes" if info.supports_stream else "no"
        print(f"{info.name}{aliases}")
        print(f"    {info.description}")
        print(f"    plugin {info.plugin}, {origin}; stream strategy: {stream}")
        if not info.parameters:
            print("    no parameters")
        for p in info.parameters:
            bounds = f", {p.bounds}" if p.bounds else ""
            default = "required" if p.required else f"default {p.default!r}"
            desc = f": {p.description}" if p.description else ""
            print(f"    - {p.name} ({p.type}, {default}{bounds}){desc}")
    if errors:
        print("plugins that failed to load:")
    for err in errors:
        origin = err.distribution or "not from a distribution"
        if err.version:
            origin += f" {err.version}"
        print(f"    {err.plugin} ({origin}): {err.exception}")
    return EXIT_OK


# ---- check --------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _cmd_check(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    import combframe
    from combframe.app.train import format_validation_error, parse_value
    from combframe.testing.parity import gradient_parity

    params: dict[str, Any] = {}
    for item in args.params:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"parameter {item!r} is not of the form key=value (e.g. kT=0.6)")
        params[key.strip()] = parse_value(raw)
    if any(n < 1 for n in args.poses):
        raise UsageError(f"--poses: every pose count must be at least 1; got {args.poses}")
    try:
        config = combframe.CombinationConfig.model_validate({"name": args.name, **params})
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
    combination = config.build()

    label = _describe(combination.to_config())
    print(f"check {label}: float64 gradients against the full-graph reference")
    print(f"  poses N in {list(args.poses)}, seeds {list(args.seeds)}, rtol {args.rtol:g}")
    result = gradient_parity(
        combination,
        n_poses=args.poses,
        seeds=args.seeds,
        rtol=args.rtol,
        on_error="record",
    )
    worst: dict[tuple[str, str], float] = {}
    for strategy, loss, _n, err in result.cases:
        worst[(strategy, loss)] = max(worst.get((strategy, loss), 0.0), err)
    for (strategy, loss), err in worst.items():
        mark = "ok  " if err <= args.rtol else "FAIL"
        print(f"  {mark} {strategy:<10} {loss:<9} worst relative error {err:.2e}")
    for note in result.skipped:
        print(f"  skip {note}")
    for error in result.errors:
        print(f"  FAIL {error}")
    case = result.worst_case()
    where = f" ({case[0]}, {case[1]} loss, N={case[2]})" if case is not None else ""
    if result.passed and result.cases:
        print(
            f"PASS {combination.name}: worst relative error {result.worst:.2e}{where} "
            f"<= {args.rtol:g} over {len(result.cases)} cases"
        )
        return EXIT_OK
    reasons = []
    if not result.worst <= args.rtol:
        reasons.append(
            f"worst relative error {result.worst:.2e}{where} > {args.rtol:g}: the pose "
            "weights do not match autograd of the combination's value"
        )
    if result.errors:
        reasons.append(f"{len(result.errors)} case(s) raised (listed above)")
    if not result.cases and not result.errors:
        reasons.append("no case ran")
    print(f"FAIL {combination.name}: {'; '.join(reasons)}")
    return EXIT_FAILED


# ---- schema -------------------------------------------------------------------------


def _cmd_schema(args: argparse.Namespace) -> int:
    import combframe

    print(json.dumps(combframe.combination_config_schema(), indent=args.indent))
    return EXIT_OK


# ---- entry point --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``combframe`` with its four subcommands."""
    parser = _Parser(
        prog="combframe",
        description="Combine per-pose predictions into one, with exact gradients.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of unexpected errors"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_train = sub.add_parser(
        "train",
        help="train on the built-in synthetic multi-pose dataset",
        description=(
            "Train a small single-pose network, combined over each compound's poses, on a "
            "built-in synthetic dataset; print held-out metrics and write a run folder."
        ),
    )
    p_train.add_argument("--config", "-c", metavar="FILE", help="YAML or JSON config file")
    p_train.add_argument(
        "--compare",
        metavar="NAMES",
        help="comma-separated combinations to train one after another, e.g. max,mean,boltzmann",
    )
    p_train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p_train.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. epochs=3 combination.name=boltzmann combination.kT=0.6",
    )
    p_train.set_defaults(func=_cmd_train)

    p_list = sub.add_parser("list", help="list installed combinations and plugin load errors")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)

    p_check = sub.add_parser(
        "check",
        help="check a combination's gradients against the full-graph reference",
        description=(
            "Compare the gradients of every strategy the combination supports with plain "
            "autograd through all pose graphs, in float64, on random models and poses, with "
            "losses on the combined prediction, on the per-pose predictions and on both. "
            "Exit status 0 on pass, 1 on failure, 2 on usage errors."
        ),
    )
    p_check.add_argument("name", metavar="NAME", help="registered combination name")
    p_check.add_argument(
        "params", nargs="*", metavar="KEY=VALUE", help="combination parameters, e.g. kT=0.6"
    )
    p_check.add_argument(
        "--rtol", type=float, default=1e-10, help="relative tolerance (default 1e-10)"
    )
    p_check.add_argument(
        "--poses", type=_int_list, default=(1, 2, 7), help="pose counts N (default 1,2,7)"
    )
    p_check.add_argument("--seeds", type=_int_list, default=(0, 1), help="seeds (default 0,1)")
    p_check.set_defaults(func=_cmd_check)

    p_schema = sub.add_parser(
        "schema", help="print the JSON schema of CombinationConfig for installed combinations"
    )
    p_schema.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")
    p_schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value arguments may follow options: `train --no-progress epochs=3 name=x`.
        rest = getattr(args, "overrides", getattr(args, "params", None))
        unknown = [a for a in extra if a.startswith("-") or rest is None]
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        if rest is not None:
            rest.extend(extra)
        if args.version:
            import combframe

            print(f"combframe {combframe.__version__}")
            return EXIT_OK
        if args.command is None:
            raise UsageError(
                "choose a command: train, list, check or schema (see `combframe --help`)"
            )
        status: int = args.func(args)
        return status
    except UsageError as exc:
        command = f"combframe {args.command}" if args is not None and args.command else "combframe"
        print(f"{command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("combframe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args is not None and args.traceback:
            traceback.print_exc()
        command = f"combframe {args.command}" if args is not None and args.command else "combframe"
        print(
            f"{command}: error: {type(exc).__name__}: {exc} (rerun with --traceback for details)",
            file=sys.stderr,
        )
        return EXIT_FAILED
