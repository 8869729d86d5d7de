"""Gradient strategies: float64 parity with the full-graph reference, RNG replay, errors,
the streaming extension point, and the work each strategy is meant to skip."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any
from unittest import mock

import pytest
import torch
from combframe_boltzmann import BoltzmannCombination
from combframe_max import MaxCombination
from combframe_mean import MeanCombination
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import combframe
import combframe.core.strategies.stream as strategies_module
from combframe.core.batch import Segments
from combframe.core.strategies import PoseRunner, resolve_strategy
from combframe.testing import (
    LOSSES,
    full_graph_gradients,
    gradient_parity,
    make_loss,
    multipose_gradients,
    peak_tensor_bytes,
)
from tests.conftest import make_mlp, make_poses

RTOL = 1e-10
STRATEGIES = ("store", "recompute", "stream", "auto")
N_POSES = (1, 2, 16)


def assert_grads_close(got: Sequence[Tensor], want: Sequence[Tensor], rtol: float = RTOL) -> None:
    scale = max(w.abs().max().item() for w in want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err = (g - w).abs().max().item() / max(scale, 1e-300)
        assert err <= rtol, f"gradient of parameter {i} differs by {err:.3e} relative (> {rtol})"


# ---- parity: every strategy x combination x loss, N = 1, 2 and many ----------------------
class MeanSquareCombination(combframe.Combination):
    r"""A plugin-style combination that opts into streaming: :math:`h = \frac1N\sum_j y_j^2`.

    :math:`\partial h/\partial y_i = 2 y_i / N = \operatorname{softmax}(0)_i \,
    (2 (y_i - c) + 2 c)`, so log weights 0, features :math:`(y_i - c, 1)` and
    coefficients :math:`(2, 2c)`. ``pose_weights`` is left to autograd.
    """

    name = "meansquare"

    def value(self, preds: Tensor) -> Tensor:
        return (preds**2).mean()

    def stream_terms(self, preds: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(preds), torch.stack([preds - center, torch.ones_like(preds)], -1)

    def stream_coefficients(self, combined: Tensor, center: Tensor) -> Tensor:
        return torch.stack([torch.full_like(center, 2.0), 2.0 * center])

    def stream_shift(self, old: Tensor, new: Tensor) -> Tensor:
        # (y - new, 1) = ((y - old) + (old - new), 1)
        one, zero = torch.ones_like(old), torch.zeros_like(old)
        return torch.stack([torch.stack([one, old - new]), torch.stack([zero, one])])


class SoftAbsMeanCombination(combframe.Combination):
    r"""A plugin-style combination without streaming: :math:`h = \frac1N\sum_j \sqrt{1 + y_j^2}`."""

    name = "softabsmean"

    def value(self, preds: Tensor) -> Tensor:
        return torch.sqrt(1.0 + preds**2).mean()


def _registered() -> list[Any]:
    return [
        pytest.param(combframe.create_combination(name), id=f"registered-{name}")
        for name in combframe.list_combinations()
        # a pooling combination needs vector outputs and its size (tests/test_attention.py)
        if not combframe.get_combination_class(name).pools
    ]


COMBINATIONS = [
    *_registered(),
    pytest.param(MaxCombination(negate_preds=False, pred_scale=3.0), id="max-t3"),
    pytest.param(MaxCombination(negate_preds=True, pred_scale=1000.0), id="min-t1000"),
    pytest.param(BoltzmannCombination(kT=0.3), id="boltzmann-kT0.3"),
    pytest.param(MeanSquareCombination(), id="plugin-streaming"),
    pytest.param(SoftAbsMeanCombination(), id="plugin-non-streaming"),
]


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_strategy_matches_full_graph(combination: combframe.Combination) -> None:
    result = gradient_parity(
        combination, strategies=STRATEGIES, losses=LOSSES, n_poses=N_POSES, seeds=(0, 1)
    )
    bad = [case for case in result.cases if not case[3] <= RTOL]
    assert result.passed, f"cases over {RTOL}: {bad}"
    ran = {(s, k, n) for s, k, n, _ in result.cases}
    streams = isinstance(combination, combframe.StreamingCombination)
    for strategy in STRATEGIES:
        for kind in LOSSES:
            for n in N_POSES:
                supported = strategy != "stream" or (streams and kind == "combined")
                assert ((strategy, kind, n) in ran) == supported, (strategy, kind, n)
    if streams:
        # stream refused the per-pose losses with a StrategyError rather than being wrong
        assert any(s.startswith("stream/per_pose") for s in result.skipped), result.skipped
        assert any(s.startswith("stream/both") for s in result.skipped), result.skipped
    else:
        assert any("does not implement streaming" in s for s in result.skipped)


def test_plugin_opts_into_streaming_through_the_protocol() -> None:
    assert isinstance(MeanSquareCombination(), combframe.StreamingCombination)
    assert not isinstance(SoftAbsMeanCombination(), combframe.StreamingCombination)
    for shipped in (MaxCombination(), MeanCombination(), BoltzmannCombination()):
        assert isinstance(shipped, combframe.StreamingCombination)


# ---- stream: numerics with widely spread predictions ------------------------------------
class OffsetModel(torch.nn.Module):
    """``y = offset + tanh(w . x + b)``: predictions spread as widely as the offsets."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(4, 1).double()
        with torch.no_grad():
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, pose: tuple[Tensor, Tensor]) -> Tensor:
        offset, x = pose
        return offset + torch.tanh(self.lin(x)).sum()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    offsets=st.lists(st.floats(-60.0, 60.0), min_size=1, max_size=12),
    combination=st.sampled_from(
        [
            MaxCombination(negate_preds=True, pred_scale=1000.0),
            MaxCombination(negate_preds=False, pred_scale=1000.0),
            BoltzmannCombination(kT=0.05),
            MeanCombination(),
        ]
    ),
    seed=st.integers(0, 3),
)
def test_stream_is_exact_with_widely_spread_predictions(
    offsets: list[float], combination: combframe.Combination, seed: int
) -> None:
    """Log weights reach ~6e4 here: exp overflows float64 without the running maximum."""
    gen = torch.Generator().manual_seed(seed)
    poses = [
        (
            torch.tensor(o, dtype=torch.float64),
            torch.randn(3, 4, generator=gen, dtype=torch.float64),
        )
        for o in offsets
    ]
    model = OffsetModel(seed)
    loss = make_loss("combined", target=0.0)
    want = full_graph_gradients(copy.deepcopy(model), combination, poses, loss)
    # both bookkeeping paths: host floats (CPU) and device tensors (CUDA and others)
    for on_host in (True, False):
        with mock.patch.object(strategies_module, "_host_scalars", return_value=on_host):
            got = multipose_gradients(model, combination, poses, loss, "stream")
        torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
        assert all(torch.isfinite(g).all() for g in got[2])
        assert_grads_close(got[2], want[2])


# ---- recompute: RNG replay and the determinism check ------------------------------------
def make_dropout_mlp(seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.4),
        torch.nn.Linear(16, 1),
        torch.nn.Flatten(0),
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [(s, k) for s in STRATEGIES for k in LOSSES if s != "stream" or k == "combined"],
)
@pytest.mark.parametrize("n", N_POSES)
def test_dropout_matches_reference_on_the_same_rng_stream(strategy: str, kind: str, n: int) -> None:
    """Reference and strategy start from one seed and draw pose 0, 1, ... in order.

    Both forwards therefore see the same dropout masks; recompute must replay pose i's
    mask in backward, and leave the global RNG where the forward left it.
    """
    combination = BoltzmannCombination(kT=0.8)
    model = make_dropout_mlp(seed=n)
    poses = make_poses(n, seed=5)
    loss = make_loss(kind)  # type: ignore[arg-type]
    torch.manual_seed(1234)
    want_c, want_p, want_g = full_graph_gradients(copy.deepcopy(model), combination, poses, loss)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(1234)
    got_c, got_p, got_g = multipose_gradients(model, combination, poses, loss, strategy)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    torch.testing.assert_close(got_p, want_p, rtol=RTOL, atol=0)
    torch.testing.assert_close(got_c, want_c, rtol=RTOL, atol=0)
    assert_grads_close(got_g, want_g)


def test_dropout_is_active_so_the_replay_matters() -> None:
    """Without restoring pose i's RNG state the masks would differ (the test above can fail)."""
    model = make_dropout_mlp(seed=0)
    pose = make_poses(1)[0]
    torch.manual_seed(0)
    first = model(pose)
    assert not torch.equal(model(pose), first)


class PrivateNoise(torch.nn.Module):
    """Noise from a private generator, which no strategy saves or restores."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        return x + 1e-3 * torch.rand(x.shape, generator=self.gen, dtype=x.dtype)


def test_recompute_check_catches_a_non_deterministic_model() -> None:
    net = torch.nn.Sequential(make_mlp(seed=1), PrivateNoise())
    poses = make_poses(3)
    wrapped = combframe.MultiPoseModel(net, "mean", strategy=combframe.Recompute(check=True))
    combined, _ = wrapped(poses)
    with pytest.raises(combframe.StrategyError, match=r"pose 0\b.*not\s+deterministic.*'store'"):
        combined.backward()
    assert all(p.grad is None for p in net.parameters()), "a failed check left gradients"


def test_recompute_without_check_is_silently_wrong_on_such_a_model() -> None:
    """Why the check exists: the unchecked gradients differ from store's."""
    grads = {}
    for strategy in ("store", "recompute"):
        net = torch.nn.Sequential(make_mlp(seed=1), PrivateNoise())
        chosen = combframe.Recompute(check=False) if strategy == "recompute" else strategy
        combined, _ = combframe.MultiPoseModel(net, "boltzmann", strategy=chosen)(make_poses(4))
        combined.backward()
        grads[strategy] = [p.grad for p in net.parameters()]
    assert any(
        not torch.equal(a, b) for a, b in zip(grads["store"], grads["recompute"], strict=True)
    )


def test_recompute_check_passes_a_deterministic_model_with_dropout() -> None:
    model = make_dropout_mlp(seed=2)
    wrapped = combframe.MultiPoseModel(model, "max", strategy=combframe.Recompute(check=True))
    combined, per_pose = wrapped(make_poses(5))
    (combined + per_pose.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- stream: clear errors ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["per_pose", "both"])
def test_stream_refuses_a_per_pose_loss_and_names_the_alternatives(kind: str) -> None:
    model = make_mlp()
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream")
    combined, per_pose = wrapped(make_poses(4))
    with pytest.raises(combframe.StrategyError, match=r"'stream'.*per-pose.*'store'.*'recompute'"):
        make_loss(kind)(combined, per_pose).backward()  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters()), "the refused backward left gradients"


def test_stream_accepts_a_per_pose_output_that_the_loss_ignores() -> None:
    model = make_mlp()
    combined, per_pose = combframe.MultiPoseModel(model, "mean", strategy="stream")(make_poses(3))
    (combined + 0.0 * per_pose.sum()).backward()  # zero per-pose gradient: exact
    assert all(p.grad is not None for p in model.parameters())


def test_stream_refuses_a_combination_without_streaming() -> None:
    model = make_mlp()
    match = r"'softabsmean'.*stream.*'store'.*'recompute'"
    with pytest.raises(combframe.StrategyError, match=match):  # when the model is built
        combframe.MultiPoseModel(model, SoftAbsMeanCombination(), strategy="stream")
    wrapped = combframe.MultiPoseModel(model, SoftAbsMeanCombination())
    wrapped.strategy = combframe.Stream()  # swapped afterwards: refused in forward
    with pytest.raises(combframe.StrategyError, match=match):
        wrapped(make_poses(2))


# ---- skipped work and flat memory (structural, no timing) --------------------------------
def _count_grads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the first pose of every chunk whose gradients are taken."""
    calls: list[int] = []
    starts: dict[int, int] = {}
    predict, grads = PoseRunner.predict, PoseRunner.grads

    def predicting(self: PoseRunner, poses: Any, start: int, *args: Any) -> Tensor:
        pred = predict(self, poses, start, *args)
        starts[id(pred)] = start
        return pred

    def counting(self: PoseRunner, pred: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(starts[id(pred)])
        return grads(self, pred, *args, **kwargs)

    monkeypatch.setattr(PoseRunner, "predict", predicting)
    monkeypatch.setattr(PoseRunner, "grads", counting)
    return calls


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_per_pose_gradient_work_without_grad(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_grads(monkeypatch)
    model = make_mlp()
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy=strategy)
    with torch.no_grad():
        wrapped(make_poses(4))
    model.requires_grad_(False)
    combined, _ = wrapped(make_poses(4))
    assert calls == []
    assert combined.grad_fn is None


def test_recompute_reruns_only_poses_with_a_nonzero_coefficient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sharp smooth-min gives exactly zero weight to poses far from the best one."""
    calls = _count_grads(monkeypatch)
    model = OffsetModel(seed=0)
    gen = torch.Generator().manual_seed(0)
    offsets = [5.0, -3.0, 40.0, 60.0]
    poses = [
        (
            torch.tensor(o, dtype=torch.float64),
            torch.randn(2, 4, generator=gen, dtype=torch.float64),
        )
        for o in offsets
    ]
    combination = MaxCombination(negate_preds=True, pred_scale=1000.0)
    loss = make_loss("combined")
    want = full_graph_gradients(copy.deepcopy(model), combination, poses, loss)
    got = multipose_gradients(model, combination, poses, loss, "recompute")
    assert calls == [1], "only the best pose has a non-zero weight"
    assert_grads_close(got[2], want[2])


class TwoHeads(torch.nn.Module):
    """A head per pose kind (the flag in the pose), as for poses from two docking programs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 1).double()
        self.b = torch.nn.Linear(4, 1).double()

    def forward(self, pose: dict[str, Tensor]) -> Tensor:
        head = self.b if bool(pose["flag"].reshape(-1)[0]) else self.a
        out: Tensor = head(pose["x"].reshape(-1, 4)).reshape(-1)
        return out


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", ["recompute", "stream"])
def test_a_parameter_only_poses_of_weight_zero_reach_gets_zeros(strategy: str, chunk: int) -> None:
    """As in the full graph: zeros (weight decay and momentum still apply), not None.

    The masked poses are not re-run for their gradient; one of them runs forward once to
    show that its graph reaches the head.
    """
    flags = [1, 1, 0, 0, 0]
    gen = torch.Generator().manual_seed(1)
    poses = [
        {"x": torch.randn(1, 4, generator=gen, dtype=torch.float64), "flag": torch.tensor(f)}
        for f in flags
    ]
    mask = 1.0 - torch.tensor(flags, dtype=torch.float64)
    ref = TwoHeads()
    ys = torch.cat([ref(p) for p in poses])
    MeanCombination().value(ys, prior=mask.log()).backward()
    net = TwoHeads()
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=chunk)
    model(poses, mask=mask)[0].backward()
    for got, want in zip(net.parameters(), ref.parameters(), strict=True):
        assert got.grad is not None and want.grad is not None
        torch.testing.assert_close(got.grad, want.grad, rtol=RTOL, atol=0)


def _backward_op_count(strategy: str, n: int) -> int:
    model = make_mlp(hidden=8)
    combined, per_pose = combframe.MultiPoseModel(model, "boltzmann", strategy=strategy)(
        make_poses(n)
    )
    loss = make_loss("combined")(combined, per_pose)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize("strategy", ["store", "stream"])
def test_backward_launches_do_not_grow_with_the_number_of_poses(strategy: str) -> None:
    """One contraction for all poses: O(parameter tensors) ops in backward, not O(N x tensors)."""
    assert _backward_op_count(strategy, 2) == _backward_op_count(strategy, 24)


def test_store_uses_one_preallocated_buffer() -> None:
    model = make_mlp()
    layout_numel = sum(p.numel() for p in model.parameters())
    runner = PoseRunner(model, None, list(model.parameters()), False, torch.device("cpu"))
    poses = make_poses(6)
    runner.scan(poses)
    segments = Segments.from_sizes([6], torch.device("cpu"))
    _, source = resolve_strategy("store").collect(runner, poses, segments, MeanCombination())
    buffer: Tensor = source.buffer  # type: ignore[attr-defined]
    assert buffer.shape == (6, layout_numel) and buffer.is_contiguous()
    manual = []
    for pose in make_poses(6):
        grads = torch.autograd.grad(model(pose).reshape(()), list(model.parameters()))
        manual.append(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(buffer, torch.stack(manual), rtol=RTOL, atol=0)


@pytest.mark.parametrize("n", [1, 20])
def test_stream_and_recompute_hold_state_independent_of_n(n: int) -> None:
    model = make_mlp()
    params = list(model.parameters())
    runner = PoseRunner(model, None, params, False, torch.device("cpu"))
    numel = sum(p.numel() for p in params)
    poses = make_poses(n)
    runner.scan(poses)
    one = Segments.from_sizes([n], torch.device("cpu"))
    _, streamed = resolve_strategy("stream").collect(runner, poses, one, BoltzmannCombination())
    # a compound of one pose lies in one chunk: re-run in the backward, no sums kept
    sums = (1, 2, numel) if n > 1 else (0,)
    assert streamed.sums.acc.shape == sums  # type: ignore[attr-defined]
    _, recomputed = resolve_strategy("recompute").collect(runner, poses, one, MeanCombination())
    # a model without randomness shares one RNG state across all poses
    assert len({id(s) for s in recomputed.reruns.rng}) == 1  # type: ignore[attr-defined]


# ---- strategy resolution ----------------------------------------------------------------
def test_resolve_strategy_names_and_instances() -> None:
    assert isinstance(resolve_strategy(" Stream "), combframe.Stream)
    custom = combframe.Recompute(check=True)
    assert resolve_strategy(custom) is custom
    assert repr(custom) == "Recompute(check=True)"
    with pytest.raises(ValueError, match=r"'keep'.*\['auto', 'recompute', 'store', 'stream'\]"):
        resolve_strategy("keep")


class Gated(torch.nn.Module):
    """Per-atom gated MLP, summed: large activations and a sizeable parameter vector."""

    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for lin in self.blocks:
            z = lin(torch.nn.functional.layer_norm(h, h.shape[-1:]))
            h = h + torch.nn.functional.silu(z) * torch.sigmoid(z)
        return h.sum(dim=(-2, -1))  # one value per pose, (B,) for a stacked chunk


def _peak_live_bytes(strategy: str, n: int, chunk_size: int = 1) -> int:
    """Peak live tensor bytes of one training step, from the profiler's memory events."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Gated().double()
    poses = [torch.randn(400, 8, generator=gen, dtype=torch.float64) for _ in range(n)]
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy=strategy, chunk_size=chunk_size)
    wrapped(poses[:1])[0].backward()  # allocate .grad before measuring

    def step() -> None:
        combined, _ = wrapped(poses)
        combined.backward()

    return peak_tensor_bytes(step)


@pytest.mark.parametrize("strategy", ["recompute", "stream"])
@pytest.mark.parametrize(("chunk_size", "few", "many"), [(1, 2, 8), (4, 8, 32)])
def test_peak_memory_is_flat_in_the_number_of_poses(
    strategy: str, chunk_size: int, few: int, many: int
) -> None:
    """Nothing of a chunk (graph, gradients) may outlive it: the peak does not grow with N.

    Both sizes span chunks: a compound inside one chunk is re-run by stream (no sums),
    and one chunk holds no sums beside its gradients in recompute (see below).
    """
    small = _peak_live_bytes(strategy, few, chunk_size)
    large = _peak_live_bytes(strategy, many, chunk_size)
    assert large <= 1.01 * small, f"peak {large} B at N={many} vs {small} B at N={few}"


def test_recompute_one_chunk_returns_its_gradients_without_a_sum() -> None:
    """With one chunk, recompute hands autograd's gradients on: no ``P``-sized sum beside them."""
    size = sum(p.numel() * p.element_size() for p in Gated().double().parameters())
    one = _peak_live_bytes("recompute", 1)
    two = _peak_live_bytes("recompute", 2)
    assert two - one >= 0.9 * size, f"peak {one} B with one chunk vs {two} B with two"


@pytest.mark.parametrize("cls", [combframe.Recompute, combframe.Stream])
@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_check_takes_a_bool_only(cls: Any, value: object) -> None:
    # Stream(check="no") used to be accepted: its repr read as off while the check ran
    with pytest.raises(
        TypeError, match=f"{cls.__name__}\\(check=...\\) takes True or False; got {value!r}"
    ):
        cls(check=value)
