"""Holes that gave a wrong number, or broke a documented promise, without an error."""

from __future__ import annotations

import collections
import math

import pydantic
import pytest
import torch
from combframe_boltzmann import BoltzmannCombination
from combframe_max import MaxCombination
from torch import Tensor

import combframe
from tests.conftest import make_mlp, make_poses
from tests.test_bad_input import atoms, state_unchanged

STRATEGIES = ("store", "recompute", "stream")


# ---- the mtenn call when nothing needs gradients --------------------------------------------
def _mtenn_inputs(model: torch.nn.Module) -> tuple[list[Tensor], list[str], list[Tensor]]:
    named = list(model.named_parameters())
    with torch.no_grad():
        preds = [model(p).reshape(()) for p in make_poses(4)]
    return preds, [n for n, _ in named], [p for _, p in named]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "eval"])
def test_the_mtenn_call_with_an_empty_grad_dict_returns_the_prediction(mode: str) -> None:
    model = make_mlp()
    comb = MaxCombination(pred_scale=3.0)
    preds, names, params = _mtenn_inputs(model)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        mode, torch.enable_grad
    )
    with context():
        combined, per_pose = comb(preds, {}, names, *params)
    torch.testing.assert_close(combined, comb.value(torch.stack(preds)))
    assert per_pose.shape == (4,)


def test_asking_for_a_gradient_after_an_empty_grad_dict_raises() -> None:
    model = make_mlp()
    preds, names, params = _mtenn_inputs(model)
    combined, _ = MaxCombination(pred_scale=3.0)(preds, {}, names, *params)
    with pytest.raises(combframe.CombinationError, match="empty grad_dict"):
        combined.backward()
    assert all(p.grad is None for p in params)


def test_an_mtenn_field_set_to_none_is_refused() -> None:
    with pytest.raises(combframe.CombinationError, match=r"'max_comb_neg' is None"):
        combframe.from_mtenn_config({"combination": "max", "max_comb_neg": None})
    with pytest.raises(combframe.CombinationError, match=r"'boltzmann_comb_kT' is None"):
        combframe.from_mtenn_config({"combination": "boltzmann", "boltzmann_comb_kT": None})
    # a field of another combination is not read
    config = combframe.from_mtenn_config({"combination": "mean", "max_comb_neg": None})
    assert config is not None and config.name == "mean"


# ---- hyperparameters that overflow -------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("max", {"pred_scale": math.inf}, "pred_scale"),
        ("max", {"pred_scale": math.nan}, "pred_scale"),
        ("boltzmann", {"kT": math.inf}, "kT"),
        ("boltzmann", {"kT": 1e-320}, "kT"),
    ],
)
def test_non_finite_hyperparameters_are_refused_by_name(
    name: str, params: dict[str, float], field: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        combframe.create_combination(name, **params)
    with pytest.raises(pydantic.ValidationError, match=field):
        combframe.CombinationConfig.model_validate({"name": name, **params})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_combined_value_that_overflows_is_caught_by_check_finite(strategy: str) -> None:
    net = make_mlp()
    comb = MaxCombination(pred_scale=1e308)
    model = combframe.MultiPoseModel(net, comb, strategy=strategy)
    with (
        state_unchanged(net),
        pytest.raises(
            combframe.CombinationError, match=r"non-finite values .* compounds \[0\].*pred_scale"
        ),
    ):
        model(make_poses(3))
    combined, _ = combframe.MultiPoseModel(net, comb, check_finite=False)(make_poses(3))
    assert not bool(torch.isfinite(combined))


def test_a_tiny_but_valid_kt_still_combines() -> None:
    comb = BoltzmannCombination(kT=1e-300)
    value = comb.value(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert math.isfinite(float(value))


# ---- poses held in mappings that are not dict-like -------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2])
def test_defaultdict_poses(chunk: int) -> None:
    class DictNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def forward(self, pose: dict[str, Tensor]) -> Tensor:
            return self.net(pose["x"])

    def pose(x: Tensor) -> collections.defaultdict[str, Tensor]:
        out: collections.defaultdict[str, Tensor] = collections.defaultdict(lambda: x)
        out["x"] = x.requires_grad_()
        return out

    poses = [pose(p) for p in make_poses(3)]
    model = combframe.MultiPoseModel(DictNet(), "mean", strategy="recompute", chunk_size=chunk)
    combined, _ = model(poses)
    combined.backward()
    assert all(p["x"].grad is not None for p in poses)


# ---- state after an error ----------------------------------------------------------------
class Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 3).double()
        self.norm = torch.nn.BatchNorm1d(3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.lin(x)).sum()


def _raising_readout(combined: Tensor) -> Tensor:
    raise RuntimeError("readout failed")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_raising_comb_readout_leaves_the_statistics_alone(strategy: str) -> None:
    net = Normed()
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy, comb_readout=_raising_readout)
    with state_unchanged(net), pytest.raises(RuntimeError, match="readout failed"):
        model(atoms(3))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_statistics_are_restored_when_only_the_inner_model_trains(strategy: str) -> None:
    class FailsAt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Normed()
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("pose 3 is broken")
            return self.inner(x)

    net = FailsAt()
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy)
    model.eval()
    net.train()  # the wrapper in eval, the model in train: statistics do change
    with state_unchanged(net), pytest.raises(RuntimeError, match="pose 3 is broken"):
        model(atoms(4))


# ---- recompute: the re-run must be the forward's ------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2])
def test_recompute_refuses_poses_modified_in_place_after_the_forward(chunk: int) -> None:
    net = make_mlp()
    poses = make_poses(4)
    combined, _ = combframe.MultiPoseModel(net, "mean", strategy="recompute", chunk_size=chunk)(
        poses
    )
    poses[0].mul_(2.0)  # plain autograd would refuse this too
    with (
        state_unchanged(net),
        pytest.raises(combframe.StrategyError, match=r"pose 0 .*modified in place.*version"),
    ):
        combined.backward()


class ReadsItsBuffer(torch.nn.Module):
    """Scales by a buffer that every training forward updates (a running count)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x) * (1.0 + 0.1 * self.count)
        if self.training:
            self.count += 1
        return out


@pytest.mark.parametrize("chunk", [1, 3])
def test_recompute_reruns_each_chunk_from_its_own_buffer_state(chunk: int) -> None:
    import copy

    from combframe.testing import full_graph_gradients, make_loss, multipose_gradients

    poses = make_poses(6)
    base = ReadsItsBuffer()
    loss = make_loss("both")
    ref = copy.deepcopy(base)
    want = full_graph_gradients(ref, MaxCombination(pred_scale=3.0), poses, loss, chunk_size=chunk)
    got_model = copy.deepcopy(base)
    got = multipose_gradients(
        got_model, MaxCombination(pred_scale=3.0), poses, loss, "recompute", chunk_size=chunk
    )
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=0)
    assert torch.equal(got_model.count, ref.count)


class PrivateNoise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + torch.rand((), generator=self.gen, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [1, 2])
def test_recompute_checks_the_rerun_by_default(chunk: int) -> None:
    net = PrivateNoise()
    model = combframe.MultiPoseModel(net, "mean", strategy="recompute", chunk_size=chunk)
    combined, _ = model(make_poses(5))
    with (
        state_unchanged(net),
        pytest.raises(
            combframe.StrategyError, match=r"re-ran poses \[0, .*private torch.Generator"
        ),
    ):
        combined.backward()
    unchecked = combframe.MultiPoseModel(
        net, "mean", strategy=combframe.Recompute(check=False), chunk_size=chunk
    )
    combined, _ = unchecked(make_poses(5))
    combined.backward()  # the user said the model is deterministic: no comparison


# ---- stream: sums centred on the best pose, whatever the order -------------------------------
class Offset(torch.nn.Module):
    """``y = offset + tanh(w . x)``: the offsets place the poses."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1).to(dtype)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))

    def forward(self, pose: tuple[Tensor, Tensor]) -> Tensor:
        offset, x = pose
        return offset + torch.tanh(self.lin(x)).sum(dim=(-2, -1))


def _offset_poses(offsets: list[float], dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.tensor(o, dtype=dtype),
            torch.randn(3, 4, generator=gen, dtype=torch.float64).to(dtype),
        )
        for o in offsets
    ]


def _grad_error(
    strategy: str, kT: float, dtype: torch.dtype, offsets: list[float], on_host: bool, chunk: int
) -> float:
    from unittest import mock

    import combframe.core.strategies.stream as strategies_module

    comb = BoltzmannCombination(kT=kT)
    want_net = Offset(torch.float64)
    y = torch.stack([want_net(p) for p in _offset_poses(offsets, torch.float64)])
    comb.value(y).backward()
    want = [p.grad for p in want_net.parameters()]
    net = Offset(dtype)
    with mock.patch.object(strategies_module, "_host_scalars", return_value=on_host):
        combined, _ = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=chunk)(
            _offset_poses(offsets, dtype)
        )
    combined.backward()
    scale = max(float(w.abs().max()) for w in want)  # type: ignore[union-attr]
    return (
        max(
            float((p.grad.double() - w).abs().max())
            for p, w in zip(net.parameters(), want, strict=True)
        )
        / scale
    )  # type: ignore[union-attr, operator]


ORDERS = {
    "first-far-above": [100.0, 0.3, -0.2, 0.1, 0.4, -0.1],
    "descending": [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
    "best-last-far": [0.0, 1.0, 2.0, 3.0, 4.0, -50.0],
}


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("kT", [1e-6, 1e-3, 0.6, 1e3, 1e6])
def test_stream_boltzmann_is_as_exact_as_store_whatever_the_pose_order(
    kT: float, order: str, on_host: bool, chunk: int
) -> None:
    offsets = ORDERS[order]
    err64 = _grad_error("stream", kT, torch.float64, offsets, on_host, chunk)
    assert err64 <= 1e-10, f"float64: {err64:.2e}"
    err32 = _grad_error("stream", kT, torch.float32, offsets, on_host, chunk)
    store32 = _grad_error("store", kT, torch.float32, offsets, on_host, 1)
    assert err32 <= max(10 * store32, 1e-5), f"float32: stream {err32:.2e}, store {store32:.2e}"


# ---- errors raised in backward come before any .grad is written ------------------------------
class Scale(torch.nn.Module):
    """A ``comb_readout`` with a parameter: ``G -> w * G``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, combined: Tensor) -> Tensor:
        return self.w * combined


class DetachesBigPoses(torch.nn.Module):
    """Detaches the prediction of a pose whose first feature is above 100."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return y.detach() if bool((x[..., 0] > 100).any()) else y


def test_a_per_pose_loss_under_stream_leaves_the_readout_grad_alone() -> None:
    net, readout = make_mlp(), Scale()
    model = combframe.MultiPoseModel(net, "max", strategy="stream", comb_readout=readout)
    out = model(compounds=[make_poses(3), make_poses(4, seed=1)])
    loss = out.combined.sum() + out.per_pose.sum()
    with (
        state_unchanged(torch.nn.ModuleList([net, readout])),
        pytest.raises(combframe.StrategyError, match="per-pose"),
    ):
        loss.backward()


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("case", ["private generator", "modified pose", "detached prediction"])
def test_recompute_errors_in_backward_leave_every_grad_alone(case: str, chunk: int) -> None:
    poses = make_poses(5)
    net: torch.nn.Module = make_mlp()
    if case == "private generator":
        net = PrivateNoise()
    elif case == "detached prediction":
        net = DetachesBigPoses()
        poses[0][0] = 1000.0  # pose 0 is in the first chunk, which the forward runs no-grad
    readout = Scale()
    model = combframe.MultiPoseModel(
        net, "mean", strategy="recompute", chunk_size=chunk, comb_readout=readout
    )
    combined, _ = model(poses)
    if case == "modified pose":
        poses[1].mul_(2.0)
    match = {
        "private generator": "re-ran poses",
        "modified pose": "modified in place",
        "detached prediction": r"any pose of the chunk of poses 0..1 does not require grad \(found"
        if chunk == 2
        else r"pose 0 does not require grad \(found when the backward re-ran it",
    }[case]
    with (
        state_unchanged(torch.nn.ModuleList([net, readout])),
        pytest.raises((combframe.CombinationError, combframe.StrategyError), match=match),
    ):
        combined.backward()


# ---- parameters of mixed dtypes, and parameters no pose uses ----------------------------------
class Mixed(torch.nn.Module):
    """A float64 model with one float32 parameter (a learnt scale), as mtenn accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.scale = torch.nn.Parameter(torch.tensor(1.25, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.scale


@pytest.mark.parametrize("chunk", [1, 2, 8])  # 8: one chunk holds every pose
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parameters_of_mixed_dtypes_get_exact_gradients_in_their_own_dtype(
    strategy: str, chunk: int
) -> None:
    import copy

    from combframe.testing import full_graph_gradients, make_loss, multipose_gradients

    base, poses = Mixed(), make_poses(5)
    loss = make_loss("combined" if strategy == "stream" else "both")
    comb = BoltzmannCombination(kT=0.6)
    want = full_graph_gradients(copy.deepcopy(base), comb, poses, loss)
    got = multipose_gradients(copy.deepcopy(base), comb, poses, loss, strategy, chunk_size=chunk)
    for g, w in zip(got[2], want[2], strict=True):
        assert g.dtype == w.dtype
        # the float32 scale: store and stream weight its per-pose gradients in float64,
        # where the full graph rounds them to float32 first
        torch.testing.assert_close(g, w, rtol=1e-6 if g.dtype == torch.float32 else 1e-10, atol=0)


class PartlyUsed(torch.nn.Module):
    """``unused`` is read by no pose; ``rare`` only by poses whose first feature is > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.rare = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return y * self.rare if bool(x[..., 0].max() > 0) else y


@pytest.mark.filterwarnings("ignore::combframe.StrategyWarning")  # store: no vmap (branch)
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unused_parameters_keep_grad_none_as_with_autograd(strategy: str, chunk: int) -> None:
    poses = make_poses(5)
    for i, pose in enumerate(poses):
        # only pose 4 reads `rare`; it is alone in its chunk, so no chunk mixes poses
        pose[..., 0] = 1.0 if i == 4 else -1.0
    net, readout = PartlyUsed(), Scale()
    readout.register_parameter("spare", torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    model = combframe.MultiPoseModel(
        net, "mean", strategy=strategy, chunk_size=chunk, comb_readout=readout
    )
    combined, _ = model(poses)
    combined.backward()
    assert net.unused.grad is None and readout.spare.grad is None
    assert net.rare.grad is not None and float(net.rare.grad) != 0.0
    assert readout.w.grad is not None
