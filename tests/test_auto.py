"""strategy="auto": the choice table, float64 parity in each choice, the loss it is told.

Each situation in which auto chooses differently (one pose per pass within the memory
budget, chunks, over the budget with a combined or a per-pose loss, a gradient hook on
an activation) is checked against the full-graph reference in float64.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import combframe
from combframe.core.strategies import STRATEGIES, resolve_strategy
from combframe.testing import full_graph_gradients, make_loss, multipose_gradients
from tests.conftest import make_mlp, make_poses
from tests.test_strategies import SoftAbsMeanCombination

RTOL = 1e-10
FEATURES, HIDDEN = 5, 16
#: Trainable numbers of ``make_mlp()``: bytes of one float64 per-pose gradient.
ROW = 8 * (FEATURES * HIDDEN + HIDDEN + HIDDEN + 1)


class _HookedInForward(torch.nn.Module):
    """An MLP that registers a gradient hook on its hidden activation in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.net[0](x)
        if h.requires_grad:
            h.register_hook(lambda g: self.seen.append(g) or None)
        out: Tensor = self.net[2](self.net[1](h)).sum()
        return out


def _backward_hooked() -> torch.nn.Module:
    net = make_mlp()
    net[2].register_full_backward_hook(lambda *_: None)
    return net


# name, model, combination, Auto(...) options, chunk size, compounds' sizes,
# the choice, words of its reason
SITUATIONS: list[tuple[str, Any, str, dict[str, Any], int, list[int], str, str]] = [
    ("one-pose-passes", make_mlp, "boltzmann", {}, 1, [7], "store", "(M, P) buffer"),
    ("combined-within", make_mlp, "boltzmann", {"losses": "combined"}, 1, [7], "store", "within"),
    ("chunks", make_mlp, "boltzmann", {}, 3, [4, 3], "recompute", "chunk_size=3"),
    ("over-budget", make_mlp, "max", {"memory_budget": 2 * ROW}, 1, [7], "recompute", "over"),
    (
        "over-budget-combined",
        make_mlp,
        "mean",
        {"memory_budget": 2 * ROW, "losses": "combined"},
        1,
        [7],
        "stream",
        "running sums",
    ),
    (
        "over-budget-combined-not-streaming",
        make_mlp,
        SoftAbsMeanCombination(),
        {"memory_budget": 2 * ROW, "losses": "combined"},
        1,
        [7],
        "recompute",
        "over",
    ),
    (
        "sums-over-budget-too",
        make_mlp,
        "boltzmann",  # k = 2 sums for each of 3 compounds: 6 rows
        {"memory_budget": 5 * ROW, "losses": "combined"},
        1,
        [2, 2, 3],
        "recompute",
        "over",
    ),
    (
        # 6 one-pose compounds and one of 2 (7 poses: store's buffer is over 5 rows);
        # only the compound of 2 keeps sums (2 rows), the others are re-run
        "one-pose-compounds-keep-no-sums",
        make_mlp,
        "boltzmann",
        {"memory_budget": 5 * ROW, "losses": "combined"},
        1,
        [1, 1, 1, 1, 1, 1, 2],
        "stream",
        "running sums",
    ),
    ("module-backward-hook", _backward_hooked, "mean", {}, 1, [5], "recompute", "backward hook"),
    ("hook-in-forward", _HookedInForward, "mean", {}, 1, [5], "recompute", "activation"),
]


def _run(situation: tuple[Any, ...], loss_kind: str) -> tuple[combframe.Auto, float]:
    """Return the Auto after one step, and the largest relative error to the full graph."""
    _, build, combination, options, chunk, sizes, _, _ = situation
    combination = (
        combframe.create_combination(combination) if isinstance(combination, str) else combination
    )
    torch.manual_seed(0)
    base = build().double()
    poses = make_poses(sum(sizes), seed=1)
    flat = sizes if len(sizes) > 1 else None
    loss = make_loss(loss_kind)  # type: ignore[arg-type]  # one of LOSSES
    want = full_graph_gradients(copy.deepcopy(base), combination, poses, loss, sizes=flat)
    auto = combframe.Auto(**options)
    got = multipose_gradients(
        copy.deepcopy(base), combination, poses, loss, auto, sizes=flat, chunk_size=chunk
    )
    errors = [
        float((g - w).norm() / w.norm().clamp_min(1e-300))
        for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True)
    ]
    return auto, max(errors)


@pytest.mark.parametrize("situation", SITUATIONS, ids=[s[0] for s in SITUATIONS])
def test_each_choice_is_the_table_and_exact(situation: tuple[Any, ...]) -> None:
    chosen, words = situation[6], situation[7]
    losses = situation[3].get("losses", "per_pose")
    loss_kind = "combined" if losses == "combined" else "both"
    auto, err = _run(situation, loss_kind)
    assert auto.chosen is not None and auto.chosen.name == chosen, auto
    assert words in auto.reason, auto.reason
    assert f"chose {chosen!r}" in repr(auto)
    assert err <= RTOL, f"{situation[0]}: relative error {err:.2e}"


def test_a_per_pose_loss_is_refused_after_a_combined_declaration_and_served_by_default() -> None:
    net, poses = make_mlp().double(), make_poses(7, seed=2)
    told = combframe.Auto(losses="combined", memory_budget=2 * ROW)
    model = combframe.MultiPoseModel(net, "mean", strategy=told)
    combined, per_pose = model(poses)
    assert told.chosen is not None and told.chosen.name == "stream"
    with pytest.raises(combframe.StrategyError, match="per-pose"):
        (combined + per_pose.sum()).backward()
    assert all(p.grad is None for p in net.parameters())

    safe = combframe.Auto(memory_budget=2 * ROW)  # losses="per_pose", the default
    assert safe.losses == "per_pose"
    situation = ("", make_mlp, "mean", {"memory_budget": 2 * ROW}, 1, [7], "", "")
    auto, err = _run(situation, "both")
    assert auto.chosen is not None and auto.chosen.name == "recompute"
    assert err <= RTOL


def test_the_choice_is_made_once_logged_and_kept() -> None:
    auto = combframe.Auto()
    model = combframe.MultiPoseModel(make_mlp(), "max", strategy=auto)
    assert auto.chosen is None and "undecided" in repr(model)
    with torch.no_grad():
        model(make_poses(3))
    assert auto.chosen is None  # nothing to choose without gradients
    logger = logging.getLogger("combframe")
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]  # a collector
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        model(make_poses(3))[0].backward()
        first = auto.chosen
        model(make_poses(30))[0].backward()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert first is not None and auto.chosen is first
    assert seen == [f"strategy='auto' chose 'store': {auto.reason}"]
    assert "chose 'store'" in repr(model)
    restored = pickle.loads(pickle.dumps(model))
    assert isinstance(restored.strategy, combframe.Auto)


def test_a_failed_first_forward_decides_nothing() -> None:
    auto = combframe.Auto()
    model = combframe.MultiPoseModel(make_mlp(), "mean", strategy=auto)
    with pytest.raises(combframe.CombinationError, match=r"torch\.float32 while its parameters"):
        model([torch.ones(1, FEATURES), torch.ones(1, FEATURES + 1)])
    assert auto.chosen is None and auto.reason == ""
    model(make_poses(2))[0].backward()
    assert auto.chosen is not None


def test_auto_is_a_strategy_name_everywhere() -> None:
    assert "auto" in STRATEGIES
    assert isinstance(resolve_strategy("Auto"), combframe.Auto)
    assert isinstance(
        combframe.MultiPoseModel(make_mlp(), "mean", strategy="auto").strategy, combframe.Auto
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"losses": "pose"}, "losses must be"),
        ({"memory_budget": -1}, "memory_budget"),
        ({"memory_budget": 1.5}, "memory_budget"),
    ],
)
def test_bad_options_say_what_is_accepted(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        combframe.Auto(**options)


def test_the_app_builds_auto_for_a_combined_loss() -> None:
    from combframe.app.building import build_model
    from combframe.app.config import TrainConfig

    model = build_model(TrainConfig(strategy="auto"), features=FEATURES)
    assert isinstance(model.strategy, combframe.Auto)
    assert model.strategy.losses == "combined"


def test_the_train_report_says_what_auto_chose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from combframe.app.cli import main

    assert main(["train", "epochs=1", "--no-progress", f"output_dir={tmp_path}", "name=a"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    chosen = metrics["strategy_chosen"]
    assert metrics["strategy"] == "auto" and chosen["name"] in {"store", "recompute", "stream"}
    assert f"strategy     auto (chose {chosen['name']}: {chosen['reason']})" in out
    args = ["train", "epochs=1", "strategy=recompute", "--no-progress", f"output_dir={tmp_path}"]
    assert main([*args, "name=r"]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["strategy_chosen"] is None
