"""The gated-attention pooling plugin: exact in every strategy (its own weights too),
batched, with priors and masks, its pose weights, its state and its registered name."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib
import torch
from combframe_attention import GatedAttention

import combframe
from combframe.testing import (
    fake_distribution,
    isolated_registry,
    peak_tensor_bytes,
    random_model,
)
from tests.conftest import make_poses
from tests.test_vectors import assert_vector_parity

ROOT = Path(__file__).resolve().parents[1]


def _attention(gated: bool = True, seed: int = 0) -> GatedAttention:
    torch.manual_seed(seed)
    return GatedAttention(dim=3, hidden=4, gated=gated).double()


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_attention_is_exact_in_every_strategy_with_its_own_weights(
    gated: bool, prior: bool
) -> None:
    comb = _attention(gated)
    assert_vector_parity(comb, prior)
    assert sum(p.numel() for p in comb.parameters()) > 0  # compared beside the model's


def test_segment_value_is_value_per_compound_and_pool_weights_are_the_softmax() -> None:
    comb = _attention()
    y = torch.randn(7, 3, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    prior = torch.randn(7, dtype=torch.float64)
    batched = comb.segment_value(y, index, 3, prior=prior)
    parts = zip(y.split([3, 1, 3]), prior.split([3, 1, 3]), strict=True)
    torch.testing.assert_close(batched, torch.stack([comb.value(e, prior=p) for e, p in parts]))
    weights = combframe.pose_weights(comb, y, index, prior=prior)
    assert weights.shape == (7,)
    torch.testing.assert_close(
        torch.zeros(3, dtype=weights.dtype).index_add(0, index, weights),
        torch.ones(3, dtype=weights.dtype),
    )
    torch.testing.assert_close((weights[:3, None] * y[:3]).sum(0), batched[0])


def test_pose_weights_can_be_trained_on() -> None:
    comb = _attention()
    net = random_model(0, 5, outputs=3)
    model = combframe.MultiPoseModel(net, comb, strategy="store")
    out = model(compounds=[make_poses(3), make_poses(2, seed=1)])
    weights = model.pose_weights(out.per_pose, out.index, create_graph=True)
    (-weights[0].log()).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert comb.V.weight.grad is not None


def test_a_head_reads_the_pooled_embedding() -> None:
    comb, head = _attention(), torch.nn.Linear(3, 1).double()
    net = random_model(0, 5, outputs=3)
    model = combframe.MultiPoseModel(
        net, comb, strategy="recompute", comb_readout=lambda g: head(g).squeeze(-1)
    )
    out = model(compounds=[make_poses(3), make_poses(2, seed=1)])
    assert out.combined.shape == (2,)
    out.combined.sum().backward()
    assert head.weight.grad is not None and comb.w.weight.grad is not None


def test_the_wrong_embedding_size_is_refused() -> None:
    model = combframe.MultiPoseModel(random_model(0, 5, outputs=2), _attention())
    with pytest.raises(combframe.CombinationError, match=r"dim=3.*shape \(4, 2\).*set dim"):
        model(make_poses(4))


@pytest.mark.parametrize("bad", [{"dim": 0}, {"dim": 3, "hidden": 0}, {"hidden": 4}])
def test_bad_parameters_name_the_field(bad: dict[str, int]) -> None:
    field = "dim" if "dim" not in bad or bad["dim"] == 0 else "hidden"
    with pytest.raises(pydantic.ValidationError, match=field):
        GatedAttention(**bad)


def test_state_dict_round_trip_keeps_its_weights_and_settings() -> None:
    net = random_model(0, 5, outputs=3)
    saved = combframe.MultiPoseModel(net, _attention(seed=1)).state_dict()
    assert {"combination.V.weight", "combination.U.weight", "combination.w.bias"} <= set(saved)
    fresh = combframe.MultiPoseModel(random_model(1, 5, outputs=3), _attention(seed=2))
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.combination.V.weight, saved["combination.V.weight"])
    assert saved["combination._extra_state"]["params"] == {"dim": 3, "hidden": 4, "gated": True}
    other = combframe.MultiPoseModel(net, GatedAttention(dim=3, hidden=4, gated=False).double())
    with pytest.raises(combframe.CombinationError, match="gated"):
        other.load_state_dict(saved)


def _declared() -> dict[str, str]:
    """The combframe entry points pyproject.toml declares (what a fresh install gets)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    entries: dict[str, str] = project["entry-points"]["combframe"]
    return entries


def test_pyproject_ships_the_plugin() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setup = config["tool"]["setuptools"]
    assert _declared()["gated_attention"] == "combframe_attention:GatedAttention"
    assert setup["package-dir"]["combframe_attention"] == "plugins/combframe_attention"
    assert "combframe_attention" in setup["packages"]
    assert setup["package-data"]["combframe_attention"] == ["py.typed"]


@contextlib.contextmanager
def _registered(tmp_path: Path) -> Iterator[None]:
    """A registry holding gated_attention through entry-point metadata: the installed one
    after a fresh install, or, in a checkout installed before the plugin was added, the
    same entry point as pyproject declares it."""
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="combframe")
        if ep.dist is not None and ep.dist.name == "combframe"
    }
    entry = {"gated_attention": _declared()["gated_attention"]}
    if "gated_attention" in installed:
        assert installed["gated_attention"] == entry["gated_attention"]
        with isolated_registry():
            yield
    else:
        fresh = fake_distribution(tmp_path, "combframe-fresh", "0", {"combframe": entry})
        with fresh, isolated_registry():
            yield


@pytest.mark.parametrize("query", ["gated_attention", "Gated-Attention", "attention"])
def test_the_registered_name_resolves_through_entry_point_metadata(
    query: str, tmp_path: Path
) -> None:
    with _registered(tmp_path):
        comb = combframe.create_combination(query, dim=4)
    assert type(comb).__name__ == "GatedAttention" and comb.name == "gated_attention"
    assert comb.to_config() == {"name": "gated_attention", "dim": 4, "hidden": 64, "gated": True}


def test_combframe_check_runs_it_on_vector_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from combframe.app.cli import main

    with _registered(tmp_path):
        code = main(["check", "gated_attention", "dim=3", "hidden=4", "--seeds", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS gated_attention" in out and "stream" in out


@pytest.mark.parametrize("strategy", ["recompute", "stream"])
def test_memory_stays_flat_in_the_bag_size(strategy: str) -> None:
    comb = _attention()
    net = random_model(0, 5, hidden=256, outputs=3)

    def full(poses: list[torch.Tensor]) -> None:
        comb.value(torch.cat([net(p) for p in poses])).sum().backward()

    def peak(n: int, wrapped: bool) -> int:
        poses = make_poses(n)
        model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=4)
        run = (lambda: model(poses)[0].sum().backward()) if wrapped else (lambda: full(poses))
        return peak_tensor_bytes(run)

    grows = peak(96, True) - peak(8, True)
    graphs = peak(96, False) - peak(8, False)
    # what grows is O(N d) (the predictions, the attention's own graph), not N pose graphs
    assert grows < graphs / 10, (grows, graphs)


def test_auto_counts_the_attention_sums_and_store_s_jacobians() -> None:
    net = random_model(0, 5, outputs=3)
    comb = _attention()
    p = sum(t.numel() for t in net.parameters())
    auto = combframe.Auto(losses="combined", memory_budget=7 * 3 * p * 8 - 1)
    combframe.MultiPoseModel(net, comb, strategy=auto)(make_poses(7))
    assert auto.chosen is not None and auto.chosen.name == "stream", auto.reason
    assert "(M, d=3, P)" in auto.reason


class _Outlier(torch.nn.Module):
    """Pose 0 (last feature 1) embeds 1e8 away from the rest: sums centred on it cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.net = random_model(3, 5, outputs=3)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(pose) + 1e8 * pose[..., -1:]
        return out


def test_stream_centres_attention_on_its_best_pose() -> None:
    comb = _attention()
    poses = [p.clone() for p in make_poses(9)]
    for k, p in enumerate(poses):
        p[..., -1] = float(k == 0)
    prior = torch.zeros(9, dtype=torch.float64)
    prior[0] = -40.0  # pose 0 weighs nothing: z is far from it
    got = {}
    for strategy in ("store", "stream"):
        net = _Outlier()
        model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=2)
        combined, _ = model(poses, prior=prior)
        combined.pow(2).sum().backward()
        got[strategy] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    scale = got["store"].abs().max()
    assert ((got["stream"] - got["store"]).abs().max() / scale) < 1e-10


def test_pose_weights_of_one_value_per_pose_are_the_attention_weights_too() -> None:
    """dim=1: (M,) predictions (a (b, 1) output is one value per pose) give alpha, as (M, 1)."""
    torch.manual_seed(0)
    comb = GatedAttention(dim=1, hidden=4).double()
    y = 3 * torch.randn(6, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 0, 1, 1])
    prior = torch.tensor([0.0, -1.0, 0.5, -torch.inf, 0.0, 0.2], dtype=torch.float64)
    flat = combframe.pose_weights(comb, y, index, prior=prior)
    column = combframe.pose_weights(comb, y[:, None], index, prior=prior)
    torch.testing.assert_close(flat, column, rtol=0, atol=0)
    alpha = [
        torch.softmax(comb.scores(e) + p, 0)
        for e, p in zip(y.split([4, 2]), prior.split([4, 2]), strict=True)
    ]
    torch.testing.assert_close(flat, torch.cat(alpha).detach())
