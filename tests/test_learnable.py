"""Learnable combination parameters declared by name (``learn=[...]``): exact gradients in
every strategy and the mtenn call, bounds kept, and carried by configs and state_dicts."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import Tensor

import combframe
import combframe.app
from combframe.app.cli import main
from combframe.testing import (
    full_graph_gradients,
    gradient_parity,
    isolated_registry,
    make_loss,
    mtenn_gradients,
    multipose_gradients,
    register_plugin,
)
from tests.conftest import make_mlp, make_poses
from tests.test_own_parameters import assert_close, own_grads


class BoundedParams(combframe.CombinationParams):
    t: float = Field(0.7, gt=0.1, description="Sharpness, bounded below.")
    mix: float = Field(0.3, gt=0, lt=1, description="Share of the mean, in (0, 1).")
    shift: float = Field(-0.2, description="Unbounded offset.")
    cap: float = Field(2.0, le=5.0, description="Bounded above only.")


class Bounded(combframe.Combination[BoundedParams]):
    """A soft minimum mixed with the mean: one learnable field of each kind of bound."""

    name = "bounded_mix"

    def value(self, preds: Tensor) -> Tensor:
        p = self.params
        soft = -p.t * torch.logsumexp(-preds / p.t, dim=0)
        return (1 - p.mix) * soft + p.mix * preds.mean() + p.shift * p.cap


def boltzmann() -> combframe.Combination:
    return combframe.create_combination({"name": "boltzmann", "kT": 0.6, "learn": ["kT"]})


def soft_min() -> combframe.Combination:
    return combframe.create_combination("max", pred_scale=3.0, learn=["pred_scale"])


def bounded() -> combframe.Combination:
    return Bounded(learn=["t", "mix", "shift", "cap"])


MAKERS: list[Callable[[], combframe.Combination]] = [boltzmann, soft_min, bounded]


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
@pytest.mark.parametrize(("sizes", "chunk"), [(None, 1), (None, 3), ([4, 1, 6], 1), ([4, 1, 6], 3)])
def test_learned_parameters_get_the_full_graph_gradient(
    make: Callable[[], combframe.Combination],
    strategy: str,
    sizes: list[int] | None,
    chunk: int,
) -> None:
    comb = make().double()
    if strategy == "stream" and not isinstance(comb, combframe.StreamingCombination):
        pytest.skip("not a streaming combination")
    poses = make_poses(11 if sizes else 7, seed=3)
    loss = make_loss("combined")
    want = full_graph_gradients(make_mlp(), comb, poses, loss, sizes=sizes)
    want_own = own_grads(comb)
    assert len(want_own) == len(comb.learn) and all(g.abs().sum() > 0 for g in want_own)
    got = multipose_gradients(
        make_mlp(), comb, poses, loss, strategy, sizes=sizes, chunk_size=chunk
    )
    assert_close(own_grads(comb), want_own)
    assert_close(got[2], want[2])


@pytest.mark.parametrize("make", MAKERS)
def test_learned_parameters_in_the_mtenn_call(make: Callable[[], combframe.Combination]) -> None:
    comb = make().double()
    poses = make_poses(6, seed=2)
    for kind in ("combined", "both"):
        loss = make_loss(kind)
        want = full_graph_gradients(make_mlp(), comb, poses, loss)
        want_own = own_grads(comb)
        got = mtenn_gradients(make_mlp(), comb, poses, loss)
        assert_close(own_grads(comb), want_own)
        assert_close(got[2], want[2])


def test_parity_harness_and_check_pass_with_learned_parameters() -> None:
    result = gradient_parity(boltzmann().double(), n_poses=(1, 5), seeds=(0,))
    assert result.passed, result.cases
    assert result.worst <= 1e-10


def test_an_optimizer_learns_within_the_bounds() -> None:
    comb = bounded()
    model = combframe.MultiPoseModel(make_mlp().float(), comb, strategy="recompute")
    names = {n for n, _ in model.named_parameters() if n.startswith("combination.")}
    assert names == {f"combination.raw_{f}" for f in ("t", "mix", "shift", "cap")}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    poses = [p.float() for p in make_poses(5, seed=1)]
    before = comb.to_config()
    for _ in range(3):
        opt.zero_grad()
        combined, _ = model(poses)
        (combined - 3.0).pow(2).backward()
        opt.step()
    after = comb.to_config()
    assert after != before
    assert after["t"] > 0.1 and 0 < after["mix"] < 1 and after["cap"] <= 5.0
    assert f"t={after['t']!r}" in repr(comb)  # repr shows the learned value


def test_initial_values_are_kept_exactly_in_float64() -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the raw parameters take the default dtype
    try:
        comb = bounded()
    finally:
        torch.set_default_dtype(default)
    for field, value in BoundedParams().model_dump().items():
        assert math.isclose(getattr(comb.settings(), field), value, rel_tol=1e-14)


def test_assigning_a_learned_parameter_sets_it() -> None:
    comb = boltzmann().double()
    comb.kT = 0.25
    assert math.isclose(comb.settings().kT, 0.25, rel_tol=1e-14)
    assert comb.to_config() == {"name": "boltzmann", "kT": comb.to_config()["kT"], "learn": ["kT"]}
    with pytest.raises(Exception, match="greater than 0"):
        comb.kT = -1.0
    assert math.isclose(comb.settings().kT, 0.25, rel_tol=1e-14)  # unchanged by the bad value


@pytest.mark.parametrize(
    ("learn", "match"),
    [
        (["negate_preds"], "learnable parameters .* are \\['pred_scale'\\]"),
        ("pred_scale", "string"),
    ],
)
def test_learning_what_cannot_be_learned_is_refused(learn: object, match: str) -> None:
    with pytest.raises(combframe.CombinationError, match=match):
        combframe.create_combination("max", learn=learn)
    with pytest.raises(ValueError, match="learn"):
        combframe.CombinationConfig.model_validate({"name": "max", "learn": learn})


def test_a_start_on_the_bound_is_refused() -> None:
    with pytest.raises(combframe.CombinationError, match="strictly inside"):
        Bounded(cap=5.0, learn=["cap"])


def test_configs_and_schema_carry_learn() -> None:
    config = combframe.CombinationConfig(name="boltzmann", kT=0.6, learn=["kT"])
    assert config.model_dump() == {"name": "boltzmann", "kT": 0.6, "learn": ["kT"]}
    assert combframe.CombinationConfig.model_validate_json(config.model_dump_json()) == config
    assert combframe.CombinationConfig.from_yaml(config.to_yaml()) == config
    assert config.learn == ("kT",) and config.build().learn == ("kT",)
    assert combframe.CombinationConfig(name="boltzmann").model_dump() == {
        "name": "boltzmann",
        "kT": 1.0,
    }
    schema = combframe.combination_config_schema()["$defs"]["BoltzmannCombinationConfig"]
    assert schema["properties"]["learn"]["items"] == {"const": "kT", "type": "string"}
    assert (
        "learn"
        not in combframe.combination_config_schema()["$defs"]["MeanCombinationConfig"]["properties"]
    )


def test_state_dict_carries_the_learned_value() -> None:
    trained = combframe.MultiPoseModel(make_mlp(), boltzmann().double())
    trained.combination.kT = 0.37
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    extra = state["combination._extra_state"]
    assert extra["learn"] == ["kT"] and math.isclose(extra["params"]["kT"], 0.37)
    fresh = combframe.MultiPoseModel(make_mlp(), boltzmann().double())  # starts at 0.6
    fresh.load_state_dict(state)
    assert math.isclose(fresh.combination.settings().kT, 0.37, rel_tol=1e-14)
    fixed = combframe.MultiPoseModel(make_mlp(), {"name": "boltzmann", "kT": 0.37})
    with pytest.raises(combframe.CombinationError, match="learned parameters"):
        fixed.load_state_dict(state, strict=False)


def test_a_plugin_declares_learnable_parameters_by_its_fields() -> None:
    with isolated_registry():
        register_plugin(Bounded)
        config = combframe.CombinationConfig(name="bounded_mix", learn=["mix"])
        assert config.build().learn == ("mix",)


def test_the_command_line_learns_saves_and_predicts_with_the_learned_value(
    tmp_path: Path,
) -> None:
    tiny = ["--no-progress", "compounds=8", "poses_per_compound=3", "hidden=4", "plot=false"]
    learn = ["combination.name=boltzmann", "combination.kT=0.6", "combination.learn=[kT]"]
    args = ["train", *tiny, "epochs=2", "batch_size=4", "dtype=float64", f"output_dir={tmp_path}"]
    assert main([*args, *learn, "name=run", "lr=0.05"]) == 0
    saved = json.loads((tmp_path / "run" / "model.json").read_text())
    assert saved["config"]["combination"] == {"name": "boltzmann", "kT": 0.6, "learn": ["kT"]}
    model = combframe.app.load(tmp_path / "run")
    kt = model.combination.settings().kT
    assert kt != 0.6 and f"kT={kt!r}" in repr(model.combination)
    extra = saved["extra_state"]["combination._extra_state"]
    assert extra["learn"] == ["kT"] and math.isclose(extra["params"]["kT"], kt, rel_tol=1e-12)
    assert main([*args, "combination.learn=[negate_preds]", "name=bad"]) == 2
