"""The ``combframe`` command line: ``train``, ``predict``, ``list``, ``check`` and ``schema``.

Run ``combframe --help`` or ``combframe <command> --help``; ``docs/cli.md`` describes
every command. Usage errors (a bad config, an unknown combination, a malformed
override) print one line on stderr and exit with status 2; a failed ``check`` and a
diverged training run exit 1; a closed standard output (``combframe check max | head
-1``) ends quietly with status 141, as a process ended by SIGPIPE.

Importing this module, ``--help`` and ``--version`` load neither torch nor the library:
each command imports what it needs when it runs. ``train`` lives in
:mod:`combframe.app.cli_train`; what every command shares (exit statuses, usage errors,
printing) in :mod:`combframe.app.console`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from combframe.app.cli_train import cmd_train
from combframe.app.console import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    count,
    describe,
    say,
)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    #: Builds text appended to ``--help`` when it is asked for (kept out of startup).
    help_epilog: Callable[[], str] | None = None

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)", prog=self.prog)

    def format_help(self) -> str:
        if self.help_epilog is not None and self.epilog is None:
            self.epilog = self.help_epilog()
        return super().format_help()


# ---- predict ------------------------------------------------------------------------


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from combframe.app.checkpoint import CheckpointError
    from combframe.app.config import ConfigError
    from combframe.app.predict import predict_file, write_csv
    from combframe.app.readers import skipped_note

    try:
        done = predict_file(
            [args.run, *(args.ensemble or [])],
            overrides=args.overrides,
            which="best" if args.best else "final",
            device=args.device,
        )
    except (ConfigError, CheckpointError) as exc:
        raise UsageError(str(exc)) from None
    output = Path(args.output)
    poses = Path(args.poses) if args.poses else None
    compounds, result = done.compounds, done.predictions
    write_csv(output, compounds, result, poses=poses)
    ensemble = f" (mean and std of {result.models} models)" if result.models > 1 else ""
    print(f"predictions  {count(len(compounds), 'compound')}{ensemble} -> {output}")
    if (note := skipped_note(done.skipped)) is not None:
        print(f"note: {note}", file=sys.stderr)
    if poses is not None:
        weights = "pooling weights alpha_i" if result.pools else "weights dG/dy_i"
        print(f"poses        {count(len(result.per_pose), 'pose')} with {weights} -> {poses}")
    return EXIT_OK


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


def _print_combination(info: Any) -> None:
    aliases = f" (aliases: {', '.join(info.aliases)})" if info.aliases else ""
    stream = "yes" if info.supports_stream else "no"
    print(f"{info.name}{aliases}")
    print(f"    {info.description}")
    print(f"    plugin {info.plugin}, {info.origin}; ", end="")
    print(f"stream strategy: {stream}")
    if not info.parameters:
        print("    no parameters")
    for p in info.parameters:
        bounds = f", {p.bounds}" if p.bounds else ""
        default = "required" if p.required else f"default {p.default!r}"
        desc = f": {p.description}" if p.description else ""
        print(f"    - {p.name} ({p.type}, {default}{bounds}){desc}")


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
        _print_combination(info)
    if errors:
        print("plugin problems (a plugin skipped, or a name two plugins claim):")
    for err in errors:
        print(f"    {err.plugin} ({err.origin}): {err.exception}")
    return EXIT_OK


# ---- check --------------------------------------------------------------------------


def _within(value: float, minimum: float, above: bool) -> bool:
    """Whether ``value`` is finite and at least ``minimum`` (above it, with ``above``)."""
    return math.isfinite(value) and (value > minimum if above else value >= minimum)


def _rule(minimum: float, above: bool) -> str:
    return f"a finite number > {minimum:g}" if above else f"at least {minimum:g}"


def _int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """Return an argparse type: comma-separated integers, each at least ``minimum``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
        if not all(_within(v, minimum, False) for v in values):
            raise argparse.ArgumentTypeError(
                f"every value must be {_rule(minimum, False)}; got {text!r}"
            )
        return values

    return parse


def _number(kind: type[float] | type[int], minimum: float, above: bool) -> Callable[[str], Any]:
    """Return an argparse type: a finite ``kind``, at least ``minimum`` (above, ``above``)."""
    noun = "a number" if kind is float else "an integer"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not _within(value, minimum, above):
            raise argparse.ArgumentTypeError(f"must be {_rule(minimum, above)}; got {text!r}")
        return value

    return parse


_positive_float = _number(float, 0, above=True)
_positive_int = _number(int, 0, above=True)
_non_negative_int = _number(int, 0, above=False)


def _parity_harness() -> Callable[..., Any]:
    """Return the gradient-parity harness (float64, every strategy, full-graph reference)."""
    from combframe.testing import gradient_parity

    return gradient_parity


def _check_params(items: Sequence[str]) -> dict[str, Any]:
    from combframe.app.config import parse_value

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"parameter {item!r} is not of the form key=value (e.g. kT=0.6)")
        params[key.strip()] = parse_value(raw)
    return params


def _checked_combination(name: str | None, params: dict[str, Any], outputs: int | None) -> Any:
    """Build the combination to check; ``--outputs`` gives a pooling one's ``dim`` if unset."""
    from pydantic import ValidationError

    import combframe
    from combframe.app.config import format_validation_error

    if name is None:
        installed = ", ".join(combframe.list_combinations()) or "none"
        raise UsageError(
            "give the NAME of the combination to check, e.g. `combframe check max` "
            f"(installed: {installed}); KEY=VALUE parameters are optional"
        )
    if outputs is not None and "dim" not in params and _pools(name):
        params = {**params, "dim": outputs}
    try:
        config = combframe.CombinationConfig.model_validate({"name": name, **params})
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None
    return config.build()


def _pools(name: str) -> bool:
    """Whether the installed combination ``name`` pools (False if there is none)."""
    import combframe

    try:
        return bool(combframe.get_combination_class(name).pools)
    except combframe.CombframeError:
        return False  # the validation below names the unknown combination


def _cmd_check(args: argparse.Namespace) -> int:
    combination = _checked_combination(args.name, _check_params(args.params), args.outputs)
    print(
        f"check {describe(combination.to_config())}: float64 gradients against the "
        "full-graph reference"
    )
    outputs = _check_outputs(combination, args.outputs)
    print(
        f"  poses N in {list(args.poses)}, seeds {list(args.seeds)}, rtol {args.rtol:g}, "
        f"{outputs} value(s) per pose"
    )
    result = _parity_harness()(
        combination.double(),
        n_poses=args.poses,
        seeds=args.seeds,
        rtol=args.rtol,
        on_error="record",
        outputs=outputs,
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
    return _check_verdict(combination.name, result, args.rtol)


def _check_outputs(combination: Any, asked: int | None) -> int:
    """Values per pose of the check's models: ``--outputs``, or a pooling one's ``dim``."""
    if not combination.pools:
        return 1 if asked is None else asked
    dim: int = getattr(combination.settings(), "dim", 1)
    if asked is not None and asked != dim:
        raise UsageError(
            f"--outputs {asked}: {combination.name} pools embeddings of dim={dim}, so its "
            f"models give {dim} values per pose; leave --outputs out or give dim={asked}"
        )
    return dim


def _check_verdict(name: str, result: Any, rtol: float) -> int:
    case = result.worst_case()
    where = f" ({case[0]}, {case[1]} loss, N={case[2]})" if case is not None else ""
    if result.passed and result.cases:
        print(
            f"PASS {name}: worst relative error {result.worst:.2e}{where} "
            f"<= {rtol:g} over {len(result.cases)} cases"
        )
        return EXIT_OK
    reasons = []
    if not result.worst <= rtol:
        reasons.append(
            f"worst relative error {result.worst:.2e}{where} > {rtol:g}: the pose "
            "weights do not match autograd of the combination's value"
        )
    if result.errors:
        reasons.append(f"{len(result.errors)} case(s) raised (listed above)")
    if not result.cases and not result.errors:
        reasons.append("no case ran")
    print(f"FAIL {name}: {'; '.join(reasons)}")
    return EXIT_FAILED


# ---- schema -------------------------------------------------------------------------


def _cmd_schema(args: argparse.Namespace) -> int:
    import combframe

    print(json.dumps(combframe.combination_config_schema(), indent=args.indent))
    return EXIT_OK


# ---- entry point --------------------------------------------------------------------

_TRACEBACK_HELP = "show the full traceback of unexpected errors"


def _help_width() -> int:
    import shutil

    return max(shutil.get_terminal_size((100, 24)).columns - 2, 60)


def _train_help() -> str:
    from combframe.app.config import config_keys_help

    return config_keys_help(width=_help_width())


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train on the built-in synthetic dataset or your own compounds",
        description=textwrap.fill(
            "Train a small single-pose network, combined over each compound's poses, on a "
            "built-in synthetic dataset (or a compounds file, data=PATH); print held-out "
            "metrics and write a run folder. Runs under torchrun on several processes.",
            width=_help_width(),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.help_epilog = _train_help
    p.add_argument("--config", "-c", metavar="FILE", help="YAML or JSON config file")
    p.add_argument(
        "--compare",
        action="append",
        metavar="NAMES|KEY=VALUES",
        help="train once per value and print one table: comma-separated combinations "
        "(max,mean,boltzmann) or any config key with its values (strategy=store,stream)",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help="train N runs with seeds seed, seed+1, ... (an ensemble for `combframe predict`)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run folder RUN from its checkpoint (after a kill or a time limit); "
        "a --compare/--seeds folder finishes all its runs",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, in any order, e.g. epochs=3 combination.name=boltzmann "
        "combination.kT=0.6 (the keys are listed below)",
    )
    p.set_defaults(func=cmd_train)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="predict compounds with a trained run (or an ensemble of runs); write a CSV",
        description="Load the model of a run folder and write one row per compound "
        "(index, name, prediction, target when known) to a CSV; with --poses, one row per "
        "pose with its prediction and its weight dG/dy_i in the combination (a pooling "
        "combination: its pooling weight alpha_i only). Several runs (--ensemble, or a "
        "folder of `train --seeds N`) give the mean and std.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder (or a --seeds/--compare folder)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="the compounds to predict: data=PATH (default: the run's own data)",
    )
    p.add_argument("--ensemble", nargs="+", metavar="RUN", help="more runs to average over")
    p.add_argument(
        "--output", "-o", default="predictions.csv", help="the compounds' CSV (predictions.csv)"
    )
    p.add_argument("--poses", metavar="FILE", help="also write the per-pose CSV to FILE")
    p.add_argument("--best", action="store_true", help="use the best-on-validation model")
    p.add_argument("--device", default="cpu", help="where to run the model (cpu)")
    p.set_defaults(func=_cmd_predict)


def _add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="check a combination's gradients against the full-graph reference",
        usage="combframe check [options] NAME [KEY=VALUE ...]",
        description=(
            "Compare the gradients of every strategy the combination supports with plain "
            "autograd through all pose graphs, in float64, on random models and poses, with "
            "losses on the combined prediction, on the per-pose predictions and on both. "
            "Exit status 0 on pass, 1 on failure, 2 on usage errors."
        ),
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="registered combination name")
    p.add_argument(
        "params",
        nargs="*",
        metavar="KEY=VALUE",
        help="optional combination parameters, e.g. kT=0.6 (default: the combination's)",
    )
    p.add_argument(
        "--rtol", type=_positive_float, default=1e-10, help="relative tolerance > 0 (1e-10)"
    )
    p.add_argument(
        "--poses", type=_int_list(1), default=(1, 2, 7), help="pose counts N >= 1 (1,2,7)"
    )
    p.add_argument("--seeds", type=_int_list(0), default=(0, 1), help="seeds >= 0 (0,1)")
    p.add_argument(
        "--outputs",
        type=_positive_int,
        default=None,
        metavar="D",
        help=(
            "values per pose of the random models, D >= 1 (1; a pooling combination: its "
            "dim, which D gives when dim= is left out)"
        ),
    )
    p.set_defaults(func=_cmd_check)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``combframe`` with its four subcommands."""
    parser = _Parser(
        prog="combframe",
        description="Combine per-pose predictions into one, with exact gradients.",
    )
    parser.add_argument("--traceback", action="store_true", help=_TRACEBACK_HELP)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_predict(sub)
    p_list = sub.add_parser("list", help="list installed combinations and plugin load errors")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)
    _add_check(sub)
    p_schema = sub.add_parser(
        "schema", help="print the JSON schema of CombinationConfig for installed combinations"
    )
    p_schema.add_argument(
        "--indent", type=_non_negative_int, default=2, help="JSON indentation >= 0 (2)"
    )
    p_schema.set_defaults(func=_cmd_schema)
    for command in sub.choices.values():
        # Also after the command, where error messages suggest it.
        command.add_argument(
            "--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP
        )
    return parser


def _version() -> str:
    """Return the installed version (``combframe.__version__``) without loading the library.

    ``combframe --version`` imports nothing of the library (its ``__init__`` included).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("combframe")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _parse(argv: Sequence[str] | None, state: dict[str, Any]) -> argparse.Namespace:
    args, extra = build_parser().parse_known_args(argv)
    state["args"] = args
    # key=value arguments may follow options: `train --no-progress epochs=3 name=x`.
    rest = getattr(args, "overrides", getattr(args, "params", None))
    unknown = [a for a in extra if a.startswith("-") or rest is None]
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    if rest is not None:
        rest.extend(extra)
    return args


def _run(argv: Sequence[str] | None, state: dict[str, Any]) -> int:
    args = _parse(argv, state)
    if args.version:
        print(f"combframe {_version()}")
        return EXIT_OK
    if args.command is None:
        raise UsageError(
            "choose a command: train, predict, list, check or schema (see `combframe --help`)"
        )
    status: int = args.func(args)
    return status


def _quiet_stdout() -> None:
    """Point stdout at the null device so that the exit's flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured in tests); nothing to flush
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.
    """
    state: dict[str, Any] = {}
    try:
        status = _run(argv, state)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except UsageError as exc:
        say(f"{exc.prog or _command(state)}: error: {exc}")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt as exc:  # ReadInterruptedError says which signal and what it left
        say(f"{_command(state)}: {exc or 'interrupted'}", every_rank=True)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except Exception as exc:
        shown = getattr(state.get("args"), "traceback", False)
        if shown:
            traceback.print_exc()
        hint = "" if shown else " (rerun with --traceback for details)"
        say(f"{_command(state)}: error: {type(exc).__name__}: {exc}{hint}", every_rank=True)
        return EXIT_FAILED


def _command(state: dict[str, Any]) -> str:
    args = state.get("args")
    command = getattr(args, "command", None)
    return f"combframe {command}" if command else "combframe"
