"""The quality matrix: tests over Python and torch versions, lint, typecheck, docs, bench.

``nox -l`` lists the sessions; ``nox`` alone runs the cheap default set; ``nox -s
tests-3.12`` runs one row. The Python versions come from the classifiers in
``pyproject.toml`` and the oldest torch from its ``torch>=`` requirement, so the matrix
follows the declared support range.

Cost of the rows (on Linux x86_64): torch on PyPI is a CUDA build, about 0.5-0.9 GB
plus about 3 GB of ``nvidia-*`` libraries per torch release (shared through pip's cache).
Only ``tests-3.11`` is cheap where a local CPU wheel of the pinned torch is on pip's
``find-links`` (as on the project's CI machines).
"""

from __future__ import annotations

import re

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "docs", "tests-3.11"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
#: Every Python the classifiers declare, e.g. ``["3.10", "3.11", "3.12", "3.13"]``.
PYTHONS: list[str] = nox.project.python_versions(PYPROJECT)
#: The torch release of the ``tests`` rows and of CI (``.ci/run``). The package itself
#: asks for ``torch>=2.4`` only; the README's set-up pins nothing.
TORCH_PINNED = "2.13.0"


def _torch_lower_bound() -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"torch\s*>=\s*([0-9.]+)", requirement.strip())
        if match:
            return match.group(1)
    raise RuntimeError("pyproject.toml declares no 'torch>=X' dependency; the matrix needs one")


TORCH_MIN = _torch_lower_bound()
#: The first torch release with wheels for a Python newer than the lower bound supports.
FIRST_TORCH_FOR_PYTHON = {"3.13": "2.5"}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _torch_requirement(python: str, row: str) -> str:
    """The pip requirement for one row of the torch axis on one Python."""
    if row == "pinned":
        return f"torch=={TORCH_PINNED}"
    if row == "newest":
        return "torch"  # the newest release pip may install here (constraints apply)
    oldest = max(TORCH_MIN, FIRST_TORCH_FOR_PYTHON.get(python, TORCH_MIN), key=_version_tuple)
    return f"torch=={oldest}.*"


def _run_tests(session: nox.Session, torch_row: str) -> None:
    python = str(session.python)
    session.install(_torch_requirement(python, torch_row))
    # Installed the way a user would: a built (non-editable) package with the test extra.
    session.install(".[test]")
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite with the pinned torch (the one CI and the README use)."""
    _run_tests(session, "pinned")


@nox.session(python=PYTHONS)
@nox.parametrize("torch", ["oldest", "newest"])
def tests_torch(session: nox.Session, torch: str) -> None:
    """Run the test suite against the oldest supported and the newest allowed torch."""
    _run_tests(session, torch)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint rules and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """``mypy --strict`` on the package and the shipped plugins."""
    session.install(f"torch=={TORCH_PINNED}")
    session.install("-e", ".[lint,test]")  # test: combframe.testing imports pytest
    session.run("mypy", "--strict", "combframe", "plugins")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors; run their examples and render checks."""
    session.install(f"torch=={TORCH_PINNED}")
    session.install("-e", ".[docs,test]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    pytest = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider")
    session.run(*pytest, "tests/test_docs.py", "tests/test_docs_render.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks in ``bench/`` and print their tables."""
    session.install(f"torch=={TORCH_PINNED}")
    session.install("-e", ".[plot]")
    session.run("python", "bench/run.py", *session.posargs)
