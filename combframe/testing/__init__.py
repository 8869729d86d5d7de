"""Test helpers for plugin authors: gradient parity, isolated registries, peak memory.

:func:`gradient_parity` checks a combination's gradients, every strategy and loss,
against the full-graph autograd reference in float64 (what ``combframe check`` runs);
:func:`full_graph_gradients` and :func:`multipose_gradients` are its two sides, for
tests of your own. Typical use in a plugin's own test suite::

    from combframe.testing import fake_distribution, isolated_registry, register_plugin

    def test_my_plugin_is_found(tmp_path):
        with isolated_registry(), fake_distribution(
            tmp_path,
            "my-plugin",
            "1.0",
            entry_points={"combframe": {"softmin": "my_plugin"}},
            package_files={"my_plugin/__init__.py": SOURCE},
        ):
            assert "softmin" in combframe.list_combinations()

With pytest, the ``combframe_registry`` fixture gives each test an isolated registry;
import it into a ``conftest.py`` (``from combframe.testing import combframe_registry``)
or list ``"combframe.testing"`` in the root conftest's ``pytest_plugins``.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from combframe.registry import (
    Registry,
    current_registry,
    register_plugin,
    set_current_registry,
)
from combframe.testing.parity import (
    LOSSES,
    ParityResult,
    full_graph_gradients,
    gradient_parity,
    make_loss,
    mtenn_gradients,
    multipose_gradients,
    random_model,
)

__all__ = [
    "LOSSES",
    "ParityResult",
    "Registry",
    "combframe_registry",
    "fake_distribution",
    "full_graph_gradients",
    "gradient_parity",
    "isolated_registry",
    "make_loss",
    "mtenn_gradients",
    "multipose_gradients",
    "peak_tensor_bytes",
    "random_model",
    "register_plugin",
]


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Return the peak live CPU tensor bytes allocated while ``fn`` runs.

    Computed from the torch profiler's memory events (allocations minus frees, in
    order), so it counts tensors only, not the allocator's caching; use it to check
    that a strategy's memory stays flat in the number of poses.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = prof.profiler.kineto_results
    events = [e for e in results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextmanager
def isolated_registry(
    *,
    autoload: bool | None = None,
    blocked: Iterable[str] | None = None,
    strict: bool | None = None,
) -> Iterator[Registry]:
    """Run a block against a fresh registry; the previous one is restored afterwards.

    Parameters
    ----------
    autoload
        ``False`` loads no entry points (an empty registry for in-process plugins only);
        ``None`` follows ``COMBFRAME_DISABLE_PLUGIN_AUTOLOAD``.
    blocked
        Entry-point names not to load; ``None`` follows ``COMBFRAME_BLOCK_PLUGINS``.
    strict
        Raise on plugin load failures; ``None`` follows ``COMBFRAME_STRICT_PLUGINS``.

    Yields
    ------
    Registry
        The fresh registry, current inside the block (``combframe.list_combinations``
        and friends use it). It is built lazily, on first use inside the block.
    """
    fresh = Registry(autoload=autoload, blocked=blocked, strict=strict)
    previous = set_current_registry(fresh)
    try:
        yield fresh
    finally:
        set_current_registry(previous)


def _metadata(name: str, version: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"


def _entry_points_txt(entry_points: Mapping[str, Mapping[str, str]]) -> str:
    blocks = []
    for group, entries in entry_points.items():
        lines = [f"[{group}]"] + [f"{key} = {value}" for key, value in entries.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


@contextmanager
def fake_distribution(
    tmp_path: Path | str,
    name: str,
    version: str,
    entry_points: Mapping[str, Mapping[str, str]],
    package_files: Mapping[str, str] | None = None,
) -> Iterator[Path]:
    """Install a distribution into ``tmp_path`` and put it on ``sys.path`` for a block.

    Writes ``<name>-<version>.dist-info`` with ``METADATA`` and ``entry_points.txt`` (so
    :func:`importlib.metadata.entry_points` finds it, exactly as for a pip-installed
    package) and, optionally, the package's source files. On exit, ``sys.path``, the
    modules imported from ``tmp_path`` and the import caches are cleaned. The current
    registry is invalidated on entry and exit, so it is rebuilt with (then without)
    the fake distribution.

    Parameters
    ----------
    tmp_path
        An empty or fresh directory (pytest's ``tmp_path``).
    name, version
        Distribution name and version (``METADATA`` ``Name`` / ``Version``).
    entry_points
        Group -> entry-point name -> value, e.g.
        ``{"combframe": {"softmin": "my_plugin"}}`` or ``"my_plugin:SoftMin"``.
    package_files
        Relative path -> source text, written under ``tmp_path`` (dedented), e.g.
        ``{"my_plugin/__init__.py": "..."}``.

    Yields
    ------
    Path
        The directory added to ``sys.path``.
    """
    root = Path(tmp_path).resolve()
    safe = name.replace("-", "_")
    dist_info = root / f"{safe}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=False)
    (dist_info / "METADATA").write_text(_metadata(name, version), encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(_entry_points_txt(entry_points), "utf-8")
    for rel, source in (package_files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    current_registry().invalidate()
    try:
        yield root
    finally:
        if str(root) in sys.path:
            sys.path.remove(str(root))
        for mod_name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file is not None and Path(file).resolve().is_relative_to(root):
                del sys.modules[mod_name]
        importlib.invalidate_caches()
        current_registry().invalidate()


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def combframe_registry() -> Iterator[Registry]:
        """Give one test a fresh registry, restored afterwards (see isolated_registry)."""
        with isolated_registry() as registry:
            yield registry
