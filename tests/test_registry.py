"""The plugin registry: entry-point discovery, names, clashes, isolation, env controls."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import Field, ValidationError

import combframe
from combframe import InvalidPluginError, PluginWarning, UnknownCombinationError
from combframe.errors import AmbiguousCombinationError
from combframe.registry import current_registry
from combframe.testing import (
    combframe_registry,  # noqa: F401 - the fixture, used by name below
    fake_distribution,
    gradient_parity,
    isolated_registry,
    register_plugin,
)
from tests.conftest import FOREIGN, make_mlp, make_poses
from tests.example_plugin import install_example_plugin

#: The plugins the installed combframe declares (pyproject.toml's entry points, as
#: installed: tests/test_attention.py checks that a fresh install carries them all).
SHIPPED = tuple(
    sorted(
        ep.name
        for ep in importlib.metadata.entry_points(group="combframe")
        if ep.dist is not None and ep.dist.name == "combframe"
    )
)
#: Every shipped name but ``max``.
NO_MAX = [n for n in SHIPPED if n != "max"]
CLASSES = {
    "max": "combframe_max:MaxCombination",
    "mean": "combframe_mean:MeanCombination",
    "boltzmann": "combframe_boltzmann:BoltzmannCombination",
    "gated_attention": "combframe_attention:GatedAttention",
}
VERSION = importlib.metadata.version("combframe")


class SoftParams(combframe.CombinationParams):
    scale: float = Field(2.0, gt=0, le=10, description="How soft.")


class Soft(combframe.Combination):
    """Scaled mean, for registry tests.

    More text that is not part of the description.
    """

    name = "Soft_Min"
    aliases = ("gentle-min",)
    deprecated_aliases = ("oldsoft",)
    Params = SoftParams
    params: SoftParams

    def value(self, preds: torch.Tensor) -> torch.Tensor:
        return preds.mean() * self.params.scale


class OtherSoft(combframe.Combination):
    """A different class that claims the same name."""

    name = "soft-min"

    def value(self, preds: torch.Tensor) -> torch.Tensor:
        return preds.sum()


class MaxAlias(combframe.Combination):
    """Claims the shipped name 'max' as an alias."""

    name = "greedy"
    aliases = ("max",)

    def value(self, preds: torch.Tensor) -> torch.Tensor:
        return preds.max()


def Plugin(*classes: object) -> types.ModuleType:  # noqa: N802 - stands for a plugin module
    """An in-process plugin module that lists the given classes in its ``__all__``."""
    module = types.ModuleType("test_plugin_module")
    for i, cls in enumerate(classes):
        setattr(module, f"C{i}", cls)
    module.__all__ = [f"C{i}" for i in range(len(classes))]
    return module


def _plugin_module(body: str) -> str:
    return "import combframe, torch\n" + textwrap.dedent(body)


GOOD_CLASS = """
class Good(combframe.Combination):
    name = "{name}"

    def value(self, preds):
        return preds.mean()
"""


def _dist(tmp_path: Path, dist: str, version: str, plugin: str, module: str, body: str):  # type: ignore[no-untyped-def]
    """Install ``module`` (source ``body``) as ``dist``'s entry point ``plugin``.

    The entry point names the module, or the attribute a ``# entry point: :attr`` line
    of ``body`` gives.
    """
    root = tmp_path / dist
    target = module + body.partition("# entry point: ")[2].partition("\n")[0]
    return fake_distribution(
        root,
        dist,
        version,
        {"combframe": {plugin: target}},
        {f"{module}/__init__.py": _plugin_module(body)},
    )


# ---- discovery --------------------------------------------------------------------------


def test_shipped_plugins_found_through_entry_points() -> None:
    declared = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="combframe")}
    assert {"boltzmann", "max", "mean"} <= set(SHIPPED)
    assert {name: declared.get(name) for name in SHIPPED} == {n: CLASSES[n] for n in SHIPPED}
    with isolated_registry():
        assert combframe.list_combinations() == list(SHIPPED)
        infos = {i.name: i for i in combframe.describe_combinations()}
        for name in SHIPPED:
            info = infos[name]
            assert (info.plugin, info.distribution, info.version) == (name, "combframe", VERSION)
            assert info.combination_class is not None
            assert info.combination_class.__module__ == CLASSES[name].split(":")[0]
            assert info.supports_stream, name
        assert combframe.plugin_errors() == []


def _run(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter that sees only the project's own plugins."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COMBFRAME_")}
    full_env.update(env)
    blocked = [full_env.get("COMBFRAME_BLOCK_PLUGINS", ""), *(f"{d}:*" for d in FOREIGN)]
    full_env["COMBFRAME_BLOCK_PLUGINS"] = ",".join(b for b in blocked if b)
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_and_metadata_import_no_plugin_module() -> None:
    out = _run(
        """
        import sys, importlib.metadata
        import combframe
        plugins = lambda: sorted(m for m in sys.modules if m.startswith("combframe_"))
        print(plugins())
        eps = importlib.metadata.entry_points(group="combframe")
        print(sorted(ep.name for ep in eps if ep.dist.name == "combframe"), plugins())
        print(combframe.list_combinations(), plugins())
        """
    )
    assert out.splitlines() == [
        "[]",
        f"{list(SHIPPED)} []",
        f"{list(SHIPPED)} {sorted(CLASSES[n].split(':')[0] for n in SHIPPED)}",
    ]


def test_blocked_shipped_plugin_is_never_imported() -> None:
    out = _run(
        """
        import sys, combframe
        print(combframe.list_combinations(), "combframe_max" in sys.modules)
        """,
        COMBFRAME_BLOCK_PLUGINS="max",
    )
    assert out == f"{NO_MAX} False"


def test_registry_is_built_once_and_cached() -> None:
    with isolated_registry() as registry:
        table = registry.table()
        combframe.list_combinations()
        combframe.create_combination("mean")
        assert registry.table() is table
        registry.invalidate()
        assert registry.table() is not table


# ---- describe ---------------------------------------------------------------------------


def test_describe_reports_parameters_bounds_and_description(
    combframe_registry: combframe.testing.Registry,  # noqa: F811
) -> None:
    register_plugin(Soft, name="soft-plugin")
    info = {i.name: i for i in combframe.describe_combinations()}["soft_min"]
    assert info.plugin == "soft-plugin"
    assert (info.distribution, info.version) == (None, None)
    assert info.aliases == ("gentle_min",)
    assert info.deprecated_aliases == ("oldsoft",)
    assert info.description == "Scaled mean, for registry tests."
    assert not info.supports_stream
    (param,) = info.parameters
    assert (param.name, param.type, param.default, param.bounds, param.description) == (
        "scale",
        "float",
        2.0,
        "> 0, <= 10",
        "How soft.",
    )
    max_params = {
        p.name: p for p in {i.name: i for i in combframe.describe_combinations()}["max"].parameters
    }
    assert (max_params["pred_scale"].bounds, max_params["pred_scale"].default) == ("> 0", 1000.0)
    assert (max_params["negate_preds"].type, max_params["negate_preds"].bounds) == ("bool", None)


# ---- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query", ["soft_min", "SOFT-MIN", " Soft_Min ", "gentle_min", "Gentle-Min"]
)
def test_names_are_normalized_and_aliases_resolve(query: str) -> None:
    with isolated_registry():
        register_plugin(Soft)
        assert combframe.get_combination_class(query) is Soft
        assert "soft_min" in combframe.list_combinations()
        assert "gentle_min" not in combframe.list_combinations()


def test_deprecated_alias_warns_with_canonical_name() -> None:
    with isolated_registry():
        register_plugin(Soft)
        with pytest.warns(FutureWarning, match="'OldSoft' is deprecated; use 'soft_min' instead"):
            comb = combframe.create_combination("OldSoft", scale=3.0)
        assert isinstance(comb, Soft)


@pytest.mark.parametrize(
    ("query", "suggestion"),
    [("boltzman", "boltzmann"), ("maxx", "max"), ("gentle_mim", "soft_min")],
)
def test_unknown_name_lists_installed_and_suggests(query: str, suggestion: str) -> None:
    with isolated_registry():
        register_plugin(Soft)
        with pytest.raises(UnknownCombinationError) as info:
            combframe.create_combination(query)
    message = str(info.value)
    assert f"Did you mean {suggestion!r}?" in message
    installed = ", ".join(map(repr, sorted([*SHIPPED, "soft_min"])))
    assert f"Installed combinations: {installed}." in message
    assert "plugin" in message and "installed" in message
    assert info.value.suggestion == suggestion


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(UnknownCombinationError) as info:
        combframe.get_combination_class("zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert info.value.suggestion is None


@pytest.mark.parametrize(
    ("params", "field", "text"),
    [
        ({"pred_scale": -2.0}, "pred_scale", "Input should be greater than 0"),
        ({"pred_scale": 1.0, "temperature": 3}, "temperature", "Extra inputs are not permitted"),
    ],
)
def test_bad_params_name_the_field_and_bound(
    params: dict[str, float], field: str, text: str
) -> None:
    with pytest.raises(ValidationError) as info:
        combframe.create_combination("max", **params)
    ((loc, msg),) = [(e["loc"], e["msg"]) for e in info.value.errors()]
    assert (loc, msg) == ((field,), text)
    assert f"{field}\n  {text}" in str(info.value)


def test_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="must be a string; got 3"):
        combframe.get_combination_class(3)  # type: ignore[arg-type]


# ---- clashes ----------------------------------------------------------------------------


def test_identical_class_registered_twice_is_a_no_op() -> None:
    with isolated_registry():
        register_plugin(Plugin(Soft), name="first")
        register_plugin(Plugin(Soft, Soft), name="second")
        register_plugin(Soft)  # the class itself, a third time
        assert combframe.list_combinations().count("soft_min") == 1
        (info,) = [i for i in combframe.describe_combinations() if i.name == "soft_min"]
        assert info.plugin == "first"
        # the shipped module, registered again in-process, changes nothing either
        import combframe_max

        register_plugin(combframe_max, name="max-again")
        assert combframe.list_combinations() == sorted([*SHIPPED, "soft_min"])


def test_in_process_clash_names_both_plugins_and_leaves_registry_intact() -> None:
    with isolated_registry():
        register_plugin(Plugin(Soft), name="first")
        before = combframe.describe_combinations()
        with pytest.raises(InvalidPluginError) as info:
            register_plugin(Plugin(OtherSoft), name="second")
        message = str(info.value)
        assert "'soft_min' is claimed twice" in message
        assert "plugin 'first' (registered in-process)" in message
        assert "plugin 'second' (registered in-process)" in message
        assert "test_registry.Soft" in message and "test_registry.OtherSoft" in message
        assert info.value.plugin is OtherSoft
        assert combframe.describe_combinations() == before
        assert combframe.get_combination_class("soft_min") is Soft


def test_alias_clash_with_shipped_plugin_names_its_distribution() -> None:
    with isolated_registry(), pytest.raises(InvalidPluginError) as info:
        register_plugin(MaxAlias, name="greedy-plugin")
    message = str(info.value)
    assert f"plugin 'max' (distribution combframe {VERSION})" in message
    assert "plugin 'greedy-plugin' (registered in-process)" in message
    assert "COMBFRAME_BLOCK_PLUGINS=greedy-plugin" in message


TWO_CLASSES = """
class Good(combframe.Combination):
    name = "dup"
    aliases = ("{alias}",)

    def value(self, preds):
        return preds.mean()


class Own(combframe.Combination):
    name = "{own}"

    def value(self, preds):
        return preds.sum()
"""


def test_entry_point_clash_makes_the_name_ambiguous_and_keeps_the_rest(tmp_path: Path) -> None:
    body_a = TWO_CLASSES.format(alias="dup_a", own="own_a")
    body_b = TWO_CLASSES.format(alias="dup_b", own="own_b")
    with (
        isolated_registry(),
        _dist(tmp_path, "dist-a", "1.0", "alpha", "clash_a", body_a),
        _dist(tmp_path, "dist-b", "2.5", "beta", "clash_b", body_b),
    ):
        with pytest.warns(PluginWarning, match="'dup' is claimed twice"):
            names = combframe.list_combinations()
        # every other name of both plugins, and every shipped one, keeps working
        assert names == [*SHIPPED, "own_a", "own_b"]
        assert combframe.get_combination_class("own_b").__module__ == "clash_b"
        assert combframe.get_combination_class("dup_a").__module__ == "clash_a"
        assert combframe.get_combination_class("dup_b").__module__ == "clash_b"
        with pytest.raises(AmbiguousCombinationError) as info:
            combframe.create_combination("dup")
        message = str(info.value)
        assert "'dup' is ambiguous" in message
        assert "plugin 'alpha' (distribution dist-a 1.0) registers clash_a.Good" in message
        assert "plugin 'beta' (distribution dist-b 2.5) registers clash_b.Good" in message
        assert "COMBFRAME_BLOCK_PLUGINS=dist-a:alpha" in message
        assert "COMBFRAME_BLOCK_PLUGINS=dist-b:beta" in message
        assert isinstance(info.value, UnknownCombinationError)  # what configs catch
        (error,) = combframe.plugin_errors()
        assert (error.plugin, error.distribution) == ("beta", "dist-b")
    # blocking one of them by distribution resolves it
    for block in ("dist-b:beta", "dist_b:*", "DIST-B:Beta"):
        with (
            isolated_registry(blocked=[block]),
            _dist(tmp_path / block, "dist-a", "1.0", "alpha", "clash_a", body_a),
            _dist(tmp_path / block, "dist-b", "2.5", "beta", "clash_b", body_b),
        ):
            (info_dup,) = [i for i in combframe.describe_combinations() if i.name == "dup"]
            assert (info_dup.plugin, info_dup.distribution) == ("alpha", "dist-a"), block
            assert "own_b" not in combframe.list_combinations()


OLD_HOOK_PLUGIN = (
    GOOD_CLASS.format(name="old_style")
    + """
with __import__("warnings").catch_warnings():
    __import__("warnings").simplefilter("ignore", DeprecationWarning)
    hookimpl = combframe.hookimpl


@hookimpl
def combframe_add_combinations():
    return [Good]
"""
)


def test_a_hook_plugin_of_0_1_still_loads_its_classes(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="combframe.hookimpl is deprecated"):
        assert combframe.hookimpl(len) is len  # a no-op marker now
    with isolated_registry(), _dist(tmp_path, "old", "0.1", "old", "old_mod", OLD_HOOK_PLUGIN):
        assert combframe.get_combination_class("old_style").__module__ == "old_mod"
        assert combframe.plugin_errors() == []


def test_third_party_max_leaves_every_other_name_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = GOOD_CLASS.format(name="max")
    with isolated_registry(), _dist(tmp_path, "greedy", "0.1", "max", "greedy_max", body):
        with pytest.warns(PluginWarning, match="'max' is claimed twice"):
            assert combframe.list_combinations() == NO_MAX
        model = combframe.MultiPoseModel(make_mlp(), "boltzmann")
        model(make_poses(3))
        with pytest.raises(AmbiguousCombinationError, match="COMBFRAME_BLOCK_PLUGINS=greedy:max"):
            combframe.MultiPoseModel(make_mlp(), "max")
    # the cure the message gives: the shipped max is back, the other one is not loaded
    monkeypatch.setenv("COMBFRAME_BLOCK_PLUGINS", "greedy:max")
    with isolated_registry(), _dist(tmp_path / "2", "greedy", "0.1", "max", "greedy_max", body):
        assert combframe.list_combinations() == list(SHIPPED)
        assert combframe.get_combination_class("max").__module__ == "combframe_max"
        assert combframe.plugin_errors() == []


def test_entry_point_clash_raises_when_strict(tmp_path: Path) -> None:
    body = GOOD_CLASS.format(name="max")
    with (
        isolated_registry(strict=True),
        _dist(tmp_path, "greedy", "0.1", "max", "greedy_max", body),
        pytest.raises(InvalidPluginError, match="'max' is claimed twice"),
    ):
        combframe.list_combinations()


@pytest.mark.parametrize("strict", [False, True])
def test_a_plugin_whose_own_classes_claim_one_name_is_isolated(
    tmp_path: Path, strict: bool
) -> None:
    twins = TWO_CLASSES.format(alias="twin", own="dup")  # both classes claim 'dup'
    text = "twins_mod.Good and twins_mod.Own both claim the name 'dup'"
    with (
        isolated_registry(strict=strict),
        _dist(tmp_path, "twins", "1.0", "twins", "twins_mod", twins),
    ):
        if strict:
            with pytest.raises(InvalidPluginError, match=text):
                combframe.list_combinations()
            return
        with pytest.warns(PluginWarning, match=text):
            assert combframe.list_combinations() == list(SHIPPED)  # the others keep working
        (error,) = combframe.plugin_errors()
        assert (error.plugin, error.distribution) == ("twins", "twins")


# ---- broken plugins ---------------------------------------------------------------------

BROKEN = {
    "import": ("raise ImportError('needs torch_scatter')", "ImportError: needs torch_scatter"),
    "not-a-class": (
        "# entry point: :X\nX = 42\n",
        "42 is not a subclass of combframe.Combination nor a module of them",
    ),
    "no-name": (
        "class NoName(combframe.Combination):\n"
        "    def value(self, preds):\n        return preds.mean()\n",
        "has no name (got None)",
    ),
    "no-value": (
        "class Lazy(combframe.Combination):\n    name = 'lazy'\n",
        "does not implement value",
    ),
    "reserved-param": (
        "class P(combframe.CombinationParams):\n    name: str = 'x'\n"
        "class Named(combframe.Combination):\n    name = 'named'\n    Params = P\n"
        "    def value(self, preds):\n        return preds.mean()\n",
        "parameter called 'name', which is reserved",
    ),
    "bad-alias": (
        GOOD_CLASS.format(name="aliased") + "Good.aliases = ('has space',)\n",
        "contains 'has space', which is not a valid combination name",
    ),
    "no-combinations": ("X = 1\n", "defines no combframe.Combination subclass"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_is_isolated_reported_and_listed(tmp_path: Path, case: str) -> None:
    body, expected = BROKEN[case]
    good = GOOD_CLASS.format(name="fine")
    with (
        isolated_registry(),
        _dist(tmp_path, "broken-dist", "0.3", "broken", "broken_mod", body),
        _dist(tmp_path, "fine-dist", "1.0", "fine", "fine_mod", good),
    ):
        with pytest.warns(PluginWarning) as record:
            names = combframe.list_combinations()
        assert names == sorted([*SHIPPED, "fine"])
        (warning,) = record
        text = str(warning.message)
        # the warning points at the caller (this file), not at combframe's internals
        assert Path(warning.filename).resolve() == Path(__file__).resolve(), warning.filename
        assert "plugin 'broken' (distribution broken-dist 0.3) failed to load" in text
        assert expected in text
        assert "COMBFRAME_STRICT_PLUGINS=1" in text
        (error,) = combframe.plugin_errors()
        assert (error.plugin, error.distribution, error.version) == ("broken", "broken-dist", "0.3")
        assert expected in error.exception
        assert str(error).startswith("plugin 'broken' (distribution broken-dist 0.3): ")
        # the failure is named when a lookup misses
        with pytest.raises(UnknownCombinationError, match="failed to load: 'broken'"):
            combframe.get_combination_class("lazy")
        # nothing of the broken plugin stays registered
        assert "broken" not in {i.plugin for i in combframe.describe_combinations()}


def test_strict_mode_raises_with_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMBFRAME_STRICT_PLUGINS", "1")
    body = BROKEN["import"][0]
    with isolated_registry(), _dist(tmp_path, "broken-dist", "0.3", "broken", "broken_mod", body):
        with pytest.raises(InvalidPluginError) as info:
            combframe.list_combinations()
        assert "plugin 'broken' (distribution broken-dist 0.3) failed to load" in str(info.value)
        assert isinstance(info.value.__cause__, ImportError)
        assert info.value.plugin == "broken"


def test_strict_flag_zero_means_not_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMBFRAME_STRICT_PLUGINS", "0")
    body = BROKEN["import"][0]
    with (
        isolated_registry(),
        _dist(tmp_path, "broken-dist", "0.3", "broken", "broken_mod", body),
        pytest.warns(PluginWarning, match="ImportError: needs torch_scatter"),
    ):
        assert combframe.list_combinations() == list(SHIPPED)


def test_strict_mode_rejects_an_invalid_class(tmp_path: Path) -> None:
    body = BROKEN["not-a-class"][0]
    with (
        isolated_registry(strict=True),
        _dist(tmp_path, "broken-dist", "0.3", "broken", "broken_mod", body),
        pytest.raises(InvalidPluginError, match=r"42 is not a subclass of combframe\.Combination"),
    ):
        combframe.list_combinations()


@pytest.mark.parametrize("value", ["max", "MAX, broken", " broken ,max"])
def test_blocklist_skips_named_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("COMBFRAME_BLOCK_PLUGINS", value)
    body = BROKEN["import"][0]
    with isolated_registry(), _dist(tmp_path, "broken-dist", "0.3", "broken", "broken_mod", body):
        blocked_broken = "broken" in value
        if blocked_broken:
            assert combframe.list_combinations() == NO_MAX
        else:
            with pytest.warns(PluginWarning, match="'broken'"):
                assert combframe.list_combinations() == NO_MAX
        with pytest.raises(UnknownCombinationError, match="Installed combinations: 'boltzmann'"):
            combframe.create_combination("max")


@pytest.mark.parametrize(("value", "autoload"), [("1", False), ("true", False), ("0", True)])
def test_autoload_switch(monkeypatch: pytest.MonkeyPatch, value: str, autoload: bool) -> None:
    monkeypatch.setenv("COMBFRAME_DISABLE_PLUGIN_AUTOLOAD", value)
    with isolated_registry():
        register_plugin(Soft)
        expected = sorted([*SHIPPED, "soft_min"]) if autoload else ["soft_min"]
        assert combframe.list_combinations() == expected


def test_shipped_module_registered_in_process_with_autoload_off() -> None:
    import combframe_max

    with isolated_registry(autoload=False):
        assert combframe.list_combinations() == []
        register_plugin(combframe_max)
        (info,) = combframe.describe_combinations()
        assert (info.name, info.plugin, info.distribution) == ("max", "combframe_max", None)


def test_invalid_in_process_plugin_raises_and_registers_nothing() -> None:
    with isolated_registry():
        before = combframe.list_combinations()
        with pytest.raises(InvalidPluginError, match="not a subclass of combframe"):
            register_plugin(int, name="ints")
        assert combframe.list_combinations() == before
        register_plugin(Plugin(Soft), name="ints")  # the name is free again
        assert "soft_min" in combframe.list_combinations()


def test_in_process_plugin_name_must_be_unique() -> None:
    with isolated_registry():
        register_plugin(Plugin(Soft), name="p")
        with pytest.raises(InvalidPluginError, match="'p' is already registered"):
            register_plugin(Plugin(OtherSoft), name="p")


# ---- reload, isolation, helpers ---------------------------------------------------------


def test_reload_rereads_environment_and_keeps_in_process_plugins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with isolated_registry():
        register_plugin(Soft)
        assert "max" in combframe.list_combinations()
        monkeypatch.setenv("COMBFRAME_BLOCK_PLUGINS", "max")
        assert "max" in combframe.list_combinations()  # cached until reloaded
        combframe.reload_registry()
        assert combframe.list_combinations() == sorted([*NO_MAX, "soft_min"])


def test_isolated_registry_restores_the_previous_one() -> None:
    outer = current_registry()
    with isolated_registry() as inner:
        assert current_registry() is inner is not outer
        register_plugin(Soft)
    assert current_registry() is outer
    assert "soft_min" not in combframe.list_combinations()


def test_fake_distribution_cleans_up(tmp_path: Path) -> None:
    path_before = list(sys.path)
    body = GOOD_CLASS.format(name="temp")
    with isolated_registry():
        with _dist(tmp_path, "temp-dist", "9.9", "temp", "temp_mod", body) as root:
            assert sys.path[0] == str(root)
            assert "temp" in combframe.list_combinations()
            assert "temp_mod" in sys.modules
            names = [d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(root)])]
            assert names == ["temp-dist"]
        assert sys.path == path_before
        assert "temp_mod" not in sys.modules
        assert "temp" not in combframe.list_combinations()


def test_fixture_gives_a_fresh_registry(
    combframe_registry: combframe.testing.Registry,  # noqa: F811
) -> None:
    assert current_registry() is combframe_registry
    register_plugin(Soft)
    assert "soft_min" in combframe.list_combinations()


# ---- the out-of-tree example plugin -----------------------------------------------------


def test_example_plugin_discovered_trains_and_matches_reference(tmp_path: Path) -> None:
    with isolated_registry(), install_example_plugin(tmp_path):
        (info,) = [i for i in combframe.describe_combinations() if i.name == "blend"]
        assert (info.plugin, info.distribution, info.version) == (
            "blend",
            "combframe-blend",
            "0.2.0",
        )
        assert info.aliases == ("mean_min_blend",)
        assert info.deprecated_aliases == ("mixmin",)
        assert [(p.name, p.bounds) for p in info.parameters] == [
            ("alpha", ">= 0, <= 1"),
            ("pred_scale", "> 0"),
        ]
        assert not info.supports_stream

        config = combframe.CombinationConfig(name="Mean-Min-Blend", alpha=0.3, pred_scale=4.0)
        assert config.name == "blend"
        net = make_mlp(seed=3)
        model = combframe.MultiPoseModel(net, config, strategy="store")
        poses = make_poses(6, seed=3)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            combined, per_pose = model(poses)
            loss = (combined - 0.5) ** 2 + 0.1 * ((per_pose - 0.5) ** 2).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        with torch.no_grad():
            y = torch.stack([net(p).reshape(()) for p in poses])
            want = 0.3 * y.mean() - 0.7 * torch.logsumexp(-4.0 * y, 0) / 4.0
        assert torch.allclose(model(poses)[0].detach(), want, rtol=1e-12)

        result = gradient_parity(config.build(), n_poses=(1, 5), seeds=(0,))
        assert result.passed, result.cases
        assert result.worst <= 1e-10
        assert {case[0] for case in result.cases} == {"store", "recompute", "auto", "mtenn"}
        assert any("does not implement streaming" in s for s in result.skipped)


SUBCLASSES_MAX = """
Max = combframe.get_combination_class("max")  # the registry, while this module is imported


class Softer(Max):
    name = "softer"
"""


@pytest.mark.parametrize("strict", [False, True])
def test_a_plugin_that_uses_the_registry_while_imported(tmp_path: Path, strict: bool) -> None:
    with isolated_registry(strict=strict), warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "defines no combination" warning
        with _dist(
            tmp_path, "combframe-softer", "1.0", "softer", "combframe_softer", SUBCLASSES_MAX
        ):
            combframe.reload_registry()
            assert "softer" in combframe.list_combinations()
            assert combframe.create_combination("softer", pred_scale=2.0).pred_scale == 2.0
            assert combframe.plugin_errors() == []


def test_a_subclass_does_not_inherit_its_parents_aliases() -> None:
    class Softest(Soft):
        """Soft, under another name."""

        name = "softest"

    with isolated_registry():
        register_plugin(Soft)
        register_plugin(Softest)  # Soft's aliases stay Soft's: no clash
        infos = {i.name: i for i in combframe.describe_combinations()}
        assert infos["softest"].aliases == ()
        assert infos["soft_min"].aliases == ("gentle_min",)
