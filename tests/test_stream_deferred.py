"""Stream with many compounds per chunk: compounds wholly inside a chunk are re-run in the
backward (as recompute does), running sums are kept only for compounds that span chunks.

Every case is compared in float64 with the full graph of the same chunks."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import pytest
import torch
from combframe_attention import GatedAttention
from combframe_boltzmann import BoltzmannCombination
from combframe_max import MaxCombination
from combframe_mean import MeanCombination
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import combframe
import combframe.core.strategies.stream as stream_module
from combframe.testing import (
    full_graph_gradients,
    make_loss,
    multipose_gradients,
    peak_tensor_bytes,
    random_model,
)
from tests.conftest import make_poses
from tests.test_own_parameters import LearnedBoltzmann, LearnedSoftMin

RTOL = 1e-10
#: Compounds inside chunks, spanning chunks, and both in one chunk (for chunk sizes 1-64).
MIXES = ([1] * 6, [2, 3, 1, 4], [7, 1, 1, 2, 9], [1, 12, 1])
CHUNKS = (1, 2, 3, 5, 64)


def _close(got: Sequence[Tensor], want: Sequence[Tensor]) -> None:
    assert len(got) == len(want)
    scale = max(w.abs().max().item() for w in want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err = (g - w).abs().max().item() / scale
        assert err <= RTOL, f"gradient {i} differs by {err:.3e} relative"


class MixesBatch(torch.nn.Module):
    """Subtracts a share of the batch mean: the poses of a batch are not independent."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.inner(x)
        return y - 0.3 * y.mean(0, keepdim=True)


def _prior(sizes: Sequence[int], masked: bool) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    prior = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    if masked:  # the second pose of every compound of more than one
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        for s, n in zip(starts.tolist(), sizes, strict=True):
            if n > 1:
                prior[s + 1] = -torch.inf
    return prior


def _parity(
    combination: combframe.Combination,
    sizes: Sequence[int],
    chunk: int,
    *,
    model: torch.nn.Module | None = None,
    outputs: int = 1,
    prior: Tensor | None = None,
    strategy: str | combframe.Strategy = "stream",
) -> None:
    net = model if model is not None else random_model(1, 5, outputs=outputs)
    poses = make_poses(sum(sizes), seed=2)
    loss = make_loss("combined")
    kw: dict[str, Any] = {"sizes": sizes, "prior": prior}
    batched = chunk if chunk > 1 else None
    want = full_graph_gradients(
        copy.deepcopy(net), copy.deepcopy(combination), poses, loss, **kw, chunk_size=batched
    )
    got = multipose_gradients(net, combination, poses, loss, strategy, **kw, chunk_size=chunk)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
    _close(got[2], want[2])


COMBINATIONS: dict[str, Callable[[], combframe.Combination]] = {
    "mean": MeanCombination,
    "max": MaxCombination,
    "boltzmann": lambda: BoltzmannCombination(kT=0.6),
    "learned_kt": LearnedBoltzmann,
    "learned_softmin": LearnedSoftMin,
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("sizes", MIXES, ids=str)
def test_stream_is_exact_for_every_mix_of_compounds_and_chunks(
    name: str, chunk: int, sizes: list[int]
) -> None:
    _parity(COMBINATIONS[name](), sizes, chunk)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", (1, 3, 64))
@pytest.mark.parametrize("sizes", MIXES, ids=str)
def test_priors_and_masks(chunk: int, sizes: list[int], masked: bool) -> None:
    _parity(BoltzmannCombination(kT=0.6), sizes, chunk, prior=_prior(sizes, masked))


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("chunk", (1, 3, 64))
@pytest.mark.parametrize("sizes", MIXES, ids=str)
def test_vector_outputs_column_wise_and_pooled(chunk: int, sizes: list[int], outputs: int) -> None:
    _parity(BoltzmannCombination(kT=0.6), sizes, chunk, outputs=outputs)
    torch.manual_seed(0)
    attention = GatedAttention(dim=outputs, hidden=4, gated=True).double()
    _parity(attention, sizes, chunk, outputs=outputs, prior=_prior(sizes, masked=True))


@pytest.mark.parametrize("chunk", (2, 3, 5, 64))
@pytest.mark.parametrize("sizes", MIXES, ids=str)
def test_a_model_that_mixes_the_poses_of_a_batch(chunk: int, sizes: list[int]) -> None:
    """No split into pieces: mixed chunks run whole, spanning poses weighted zero on re-run."""
    model = MixesBatch(random_model(1, 5))
    for _ in range(2):  # the first step decides the verdict, the second uses it
        _parity(BoltzmannCombination(kT=0.6), sizes, chunk, model=model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=7),
    chunk=st.integers(1, 9),
    mixes=st.booleans(),
    learned=st.booleans(),
)
def test_any_mix_hypothesis(sizes: list[int], chunk: int, mixes: bool, learned: bool) -> None:
    model = MixesBatch(random_model(1, 5)) if mixes and chunk > 1 else None
    if learned:  # its own parameter; it takes no prior
        _parity(LearnedBoltzmann(), sizes, chunk, model=model)
    else:
        prior = _prior(sizes, masked=True)
        _parity(BoltzmannCombination(kT=0.6), sizes, chunk, model=model, prior=prior)


def test_dropout_replays_the_forward_masks() -> None:
    sizes = [2, 3, 1, 4]
    model = random_model(1, 5, dropout=0.4)
    poses = make_poses(sum(sizes), seed=2)
    loss = make_loss("combined")
    torch.manual_seed(7)
    want = full_graph_gradients(
        copy.deepcopy(model), MeanCombination(), poses, loss, sizes=sizes, chunk_size=3
    )
    after = torch.get_rng_state()
    torch.manual_seed(7)
    got = multipose_gradients(
        model, MeanCombination(), poses, loss, "stream", sizes=sizes, chunk_size=3
    )
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
    _close(got[2], want[2])


class Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(5, dtype=torch.float64)
        self.head = random_model(1, 5)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.norm(x.reshape(-1, 5)).reshape(x.shape))
        return out


def test_batch_norm_buffers_are_updated_once_per_chunk_as_in_the_forward() -> None:
    sizes = [1, 2, 1, 1, 3]
    model = Normed()
    reference = copy.deepcopy(model)
    _parity(MeanCombination(), sizes, 3, model=model)
    poses = make_poses(sum(sizes), seed=2)
    loss = make_loss("combined")
    full_graph_gradients(reference, MeanCombination(), poses, loss, sizes=sizes, chunk_size=3)
    # _parity ran the reference on a copy; compare the statistics after one step each
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
    torch.testing.assert_close(model.norm.running_var, reference.norm.running_var)
    assert model.norm.num_batches_tracked == reference.norm.num_batches_tracked == 3


class Shifted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = random_model(1, 5)

    def forward(self, pose: dict[str, Tensor]) -> Tensor:
        out: Tensor = self.net(pose["x"] + pose["shift"])
        return out


@pytest.mark.parametrize("chunk", (1, 4))
def test_pose_tensors_that_require_grad_including_one_only_a_masked_pose_reads(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    shifts = [
        torch.randn(1, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    xs = make_poses(4, seed=2)
    # pose 2 (masked) alone reads shifts[2]; shifts[0] is read by poses 0 and 1
    which = [0, 0, 2, 1]
    poses = [{"x": x, "shift": shifts[k]} for x, k in zip(xs, which, strict=True)]
    prior = torch.tensor([0.0, 0.0, -torch.inf, 0.0], dtype=torch.float64)
    model = Shifted()
    reference = copy.deepcopy(model)
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream", chunk_size=chunk)
    compounds = [poses[:1], poses[1:3], poses[3:]]
    combined = wrapped(compounds=compounds, prior=prior).combined
    (combined * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
    got = [s.grad.clone() for s in shifts]  # type: ignore[union-attr]
    got_p = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    for s in shifts:
        s.grad = None
    full = combframe.MultiPoseModel(reference, "boltzmann", strategy="store")
    want_c = full(compounds=compounds, prior=prior).combined
    (want_c * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(combined, want_c, rtol=RTOL, atol=0)
    _close(got, [s.grad for s in shifts])  # type: ignore[misc]
    _close(got_p, [p.grad for p in reference.parameters()])  # type: ignore[misc]
    assert got[2].abs().max() == 0  # reached by a masked pose: zeros, not None


@pytest.mark.parametrize("chunk", (1, 4))
def test_comb_readout_and_gradient_accumulation_over_two_backward_calls(chunk: int) -> None:
    sizes = [1, 3, 1, 2]
    model = random_model(1, 5)
    reference = copy.deepcopy(model)
    readout = torch.nn.Linear(1, 1).double()
    ref_readout = copy.deepcopy(readout)
    compounds_of = lambda poses: [poses[:1], poses[1:4], poses[4:5], poses[5:]]  # noqa: E731
    poses = compounds_of(make_poses(sum(sizes), seed=2))
    out = {}
    for name, net, head, strategy in (
        ("stream", model, readout, "stream"),
        ("store", reference, ref_readout, "store"),
    ):
        wrapped = combframe.MultiPoseModel(
            net,
            LearnedBoltzmann(),
            strategy=strategy,
            chunk_size=chunk,
            comb_readout=lambda g, head=head: head(g[:, None])[:, 0],
        )
        combined = wrapped(compounds=poses).combined
        loss = (combined**2).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        grads = [p.grad for p in net.parameters()] + [p.grad for p in head.parameters()]
        grads += [p.grad for p in wrapped.combination.parameters()]
        out[name] = grads
    _close(out["stream"], out["store"])  # type: ignore[arg-type]


class PrivateNoise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = random_model(1, 5)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.net(x)
        return y + 1e-3 * torch.rand(y.shape, generator=self.gen, dtype=y.dtype)


@pytest.mark.parametrize("chunk", (1, 2))
def test_a_model_that_is_not_deterministic_is_refused_before_any_grad(chunk: int) -> None:
    """The first chunk (compounds inside it) is re-run in the backward; the last is kept."""
    model = PrivateNoise()
    wrapped = combframe.MultiPoseModel(model, "mean", strategy="stream", chunk_size=chunk)
    compounds = [make_poses(1), make_poses(1, seed=3), make_poses(2, seed=1)]
    combined = wrapped(compounds=compounds).combined
    with pytest.raises(combframe.StrategyError, match=r"not deterministic.*Stream\(check=False\)"):
        combined.sum().backward()
    assert all(p.grad is None for p in model.parameters()), "a failed check left gradients"
    unchecked = combframe.Stream(check=False)
    assert (
        repr(unchecked) == "Stream(check=False)"
        and repr(combframe.Stream()) == "Stream(check=True)"
    )
    wrapped = combframe.MultiPoseModel(model, "mean", strategy=unchecked, chunk_size=chunk)
    wrapped(compounds=compounds).combined.sum().backward()


def test_a_schedule_step_between_forward_and_backward_changes_nothing() -> None:
    sizes = [1, 2, 1]
    model = random_model(1, 5)
    poses = make_poses(sum(sizes), seed=2)
    compounds = [poses[:1], poses[1:3], poses[3:]]
    got = {}
    for step in (False, True):
        comb = BoltzmannCombination(kT=0.6)
        wrapped = combframe.MultiPoseModel(model, comb, strategy="stream", chunk_size=2)
        model.zero_grad()
        combined = wrapped(compounds=compounds).combined
        if step:
            comb.kT = 3.0
        combined.sum().backward()
        got[step] = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    _close(got[True], got[False])


class Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = random_model(1, 5)
        self.calls: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(torch.is_grad_enabled())
        out: Tensor = self.net(x)
        return out


@pytest.mark.parametrize("sizes", [[1] * 16, [2] * 8, [4] * 4, [16]], ids=str)
def test_one_chunk_of_many_compounds_is_one_forward_and_one_backward(
    sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of 16 poses: one forward with a graph, one backward of it, whatever the mix."""
    model = Counting()
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream", chunk_size=16)
    poses = make_poses(16, seed=2)
    cut = torch.tensor([0, *sizes]).cumsum(0).tolist()
    compounds = [poses[a:b] for a, b in itertools.pairwise(cut)]
    wrapped(compounds=compounds)  # the first step may decide how the model treats a batch
    model.calls.clear()
    backward = torch.autograd.grad
    passes: list[int] = []

    def counted(*args: Any, **kw: Any) -> Any:
        passes.append(1)
        return backward(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    combined = wrapped(compounds=compounds).combined
    combined.sum().backward()
    assert model.calls == [True]
    # one backward of the chunk (and, for compounds inside it, one of the combination)
    assert len(passes) <= 2


@pytest.mark.parametrize("chunk", (1, 4))
def test_no_sums_are_kept_for_compounds_inside_a_chunk(chunk: int) -> None:
    model = random_model(1, 5)
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream", chunk_size=chunk)
    seen: list[Any] = []
    collect = combframe.Stream.collect

    def spy(self: Any, *args: Any) -> Any:
        out = collect(self, *args)
        seen.append(out[1])
        return out

    monkey = pytest.MonkeyPatch()
    monkey.setattr(combframe.Stream, "collect", spy)
    try:
        wrapped(compounds=[make_poses(1), make_poses(1, seed=1), make_poses(9, seed=2)])
    finally:
        monkey.undo()
    sums = seen[0].sums
    assert sums.acc.shape[0] == 1  # the compound of 9 poses only


class Hooked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = random_model(1, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = x * 2.0
        if h.requires_grad:
            h.register_hook(lambda g: g.clamp(-0.1, 0.1))
        out: Tensor = self.net(h)
        return out


@pytest.mark.parametrize("chunk", (1, 4))
def test_an_activation_hook_is_still_refused_in_the_forward(chunk: int) -> None:
    """Compounds inside a chunk could honour it (their chunk is re-run with its c_i), but
    the spanning ones could not: stream refuses such a model, before any .grad."""
    poses = [p.requires_grad_() for p in make_poses(4, seed=2)]
    model = Hooked()
    wrapped = combframe.MultiPoseModel(model, "mean", strategy="stream", chunk_size=chunk)
    with pytest.raises(combframe.StrategyError, match="strategy='recompute'"):
        wrapped(compounds=[poses[:1], poses[1:2], poses[2:3]])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk", (1, 3, 5))
@pytest.mark.parametrize("sizes", MIXES, ids=str)
def test_the_device_bookkeeping_too(chunk: int, sizes: list[int]) -> None:
    """The tensor bookkeeping a GPU runs (the CPU's is on Python floats)."""
    with mock.patch.object(stream_module, "_host_scalars", return_value=False):
        _parity(LearnedBoltzmann(), sizes, chunk)
        _parity(BoltzmannCombination(kT=0.6), sizes, chunk, prior=_prior(sizes, masked=True))
        _parity(MeanCombination(), sizes, chunk, model=MixesBatch(random_model(1, 5)))


def _peak_bytes(count: int) -> int:
    """Peak live tensor bytes of one step of ``count`` one-pose compounds, chunks of 4."""
    from tests.test_strategies import Gated

    gen = torch.Generator().manual_seed(0)
    model = Gated().double()
    poses = [torch.randn(100, 8, generator=gen, dtype=torch.float64) for _ in range(count)]
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream", chunk_size=4)
    wrapped(compounds=[poses[:1]]).combined.sum().backward()  # allocate .grad first

    def step() -> None:
        wrapped(compounds=[[p] for p in poses]).combined.sum().backward()

    return peak_tensor_bytes(step)


def test_peak_memory_does_not_grow_with_compounds_inside_chunks() -> None:
    """No running sums for them: one chunk graph, whatever the number of compounds.

    From two chunks on: one chunk's gradients are handed on with no sum beside them.
    """
    few, many = _peak_bytes(8), _peak_bytes(32)
    assert many <= 1.02 * few, f"peak {many} B for 32 compounds vs {few} B for 8"


# ---- chunks aligned to compounds, once the model is known to treat poses independently


class Sizes(torch.nn.Module):
    """Records the number of poses of each call (one call per piece run)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        out: Tensor = self.inner(x)
        return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunk=st.integers(2, 8),
    data=st.data(),
    kind=st.sampled_from(["prior", "masked", "vector", "attention", "learned"]),
    host=st.booleans(),
)
def test_second_step_packs_compounds_into_aligned_chunks_exactly(
    chunk: int, data: st.DataObject, kind: str, host: bool
) -> None:
    """On the second step (verdict known) every piece holds whole compounds of at most
    ``chunk`` poses, or part of a larger one alone; gradients equal the full graph's.

    ``host``: the CPU's bookkeeping on Python floats, else the tensor one a GPU runs."""
    sizes = data.draw(st.lists(st.integers(1, 2 * chunk), min_size=1, max_size=12))
    outputs = 2 if kind in ("vector", "attention") else 1
    model = Sizes(random_model(1, 5, outputs=outputs))
    torch.manual_seed(0)
    combination: combframe.Combination = {
        "attention": lambda: GatedAttention(dim=outputs, hidden=4, gated=True).double(),
        "learned": LearnedBoltzmann,
    }.get(kind, lambda: BoltzmannCombination(kT=0.6))()
    prior = None if kind == "learned" else _prior(sizes, masked=kind != "prior")
    strategy = combframe.Stream()
    with _plans() as plans, mock.patch.object(stream_module, "_host_scalars", return_value=host):
        for _ in range(2):  # the first step decides the verdict, the second uses it
            model.calls.clear()
            _parity(combination, sizes, chunk, model=model, prior=prior, strategy=strategy)
    # forward and backward: no piece of more than ``chunk`` poses
    assert max(model.calls) <= chunk
    # only the compounds of more than ``chunk`` poses span chunks (keep sums)
    assert plans[-1].spans == [n > chunk for n in sizes]


@contextlib.contextmanager
def _plans() -> Iterator[list[Any]]:
    """Within it, the :class:`Plan` of every stream forward, in order."""
    seen: list[Any] = []
    real = stream_module.Plan

    def plan(*args: Any) -> Any:
        seen.append(real(*args))
        return seen[-1]

    with mock.patch.object(stream_module, "Plan", side_effect=plan):
        yield seen


def test_no_sums_for_compounds_of_at_most_a_chunk_from_the_second_step() -> None:
    """Runner's chunks on the first step (3 compounds span), aligned on the second (1)."""
    sizes, chunk = [3, 3, 3, 9, 2], 4
    model = Sizes(random_model(1, 5))
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream", chunk_size=chunk)
    poses = make_poses(sum(sizes), seed=2)
    cut = [0, *itertools.accumulate(sizes)]
    compounds = [poses[a:b] for a, b in itertools.pairwise(cut)]
    with _plans() as plans:
        for _ in range(2):
            model.calls.clear()
            wrapped(compounds=compounds).combined.sum().backward()
    assert [sum(p.spans) for p in plans] == [3, 1]
    assert max(model.calls) <= chunk


def _packed_peak_bytes(count: int) -> int:
    """Peak live tensor bytes of a second step of ``count`` compounds of 3 poses, chunks of 16."""
    from tests.test_strategies import Gated

    gen = torch.Generator().manual_seed(0)
    model = Gated(width=32).double()
    poses = [torch.randn(10, 8, generator=gen, dtype=torch.float64) for _ in range(3 * count)]
    compounds = [poses[k : k + 3] for k in range(0, len(poses), 3)]
    wrapped = combframe.MultiPoseModel(model, "boltzmann", strategy="stream", chunk_size=16)
    wrapped(compounds=compounds).combined.sum().backward()  # .grad allocated, verdict known

    def step() -> None:
        wrapped(compounds=compounds).combined.sum().backward()

    return peak_tensor_bytes(step)


def test_peak_memory_of_a_packed_batch_does_not_grow_with_its_compounds() -> None:
    """256 compounds of 3 poses in chunks of 16: no running sums, so about 32's peak."""
    few, many = _packed_peak_bytes(32), _packed_peak_bytes(256)
    assert many <= 1.1 * few, f"peak {many} B for 256 compounds vs {few} B for 32"


def test_a_model_that_mixes_poses_keeps_the_runners_chunks() -> None:
    """Batch norm in train mode: two steps, the same predictions and chunks as recompute."""
    sizes, chunk = [3, 3, 3, 9, 2], 4
    poses = make_poses(sum(sizes), seed=2)
    cut = [0, *itertools.accumulate(sizes)]
    compounds = [poses[a:b] for a, b in itertools.pairwise(cut)]
    model = Sizes(Normed())
    reference = copy.deepcopy(model)
    out: dict[str, list[Any]] = {"stream": [], "recompute": []}
    for net, strategy in ((model, "stream"), (reference, "recompute")):
        wrapped = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=chunk)
        for _ in range(2):
            net.calls.clear()
            result = wrapped(compounds=compounds)
            out[strategy] += [result.per_pose.detach(), list(net.calls)]
            result.combined.sum().backward()
    assert out["stream"][1] == out["stream"][3] == [chunk] * 5  # the runner's chunks
    torch.testing.assert_close(out["stream"], out["recompute"], rtol=0, atol=0)
