"""Batched execution: chunks of poses, batches of compounds, and gradients to every input.

Every case is checked against the float64 full-graph reference to 1e-10: each strategy x
combination x chunk size (1, 3, all) x loss mix x one and several compounds, with stacked
tensor poses and with graph poses of varying atom counts.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
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
from bench._graph import GraphModel, graph_collate, make_graph_poses
from combframe.segment import (
    segment_logsumexp,
    segment_max,
    segment_mean,
    segment_softmax,
    segment_sum,
)
from combframe.testing import LOSSES, full_graph_gradients, make_loss, multipose_gradients
from tests.conftest import make_mlp
from tests.test_strategies import MeanSquareCombination, SoftAbsMeanCombination

RTOL = 1e-10
STRATEGIES = ("store", "recompute", "stream", "auto")


def rel_err(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    scale = max(max(float(w.abs().max()) for w in want if w.numel()), 1e-300)
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) / scale


def graph_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GraphModel(width=8, layers=2).double()


def graph_poses(n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    return make_graph_poses(n, atoms=7, seed=seed, dtype=torch.float64, spread=3)


def tensor_poses(n: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((1, 5), generator=gen, dtype=torch.float64) for _ in range(n)]


POSES: dict[str, tuple[Callable[[int], torch.nn.Module], Callable[[int], list[Any]], Any]] = {
    "tensor": (lambda s: make_mlp(seed=s), tensor_poses, None),
    "graph": (graph_model, graph_poses, graph_collate),
}
COMBINATIONS = [
    pytest.param(MaxCombination(pred_scale=3.0), id="max"),
    pytest.param(MeanCombination(), id="mean"),
    pytest.param(BoltzmannCombination(kT=0.7), id="boltzmann"),
    pytest.param(MeanSquareCombination(), id="plugin-streaming"),
    pytest.param(SoftAbsMeanCombination(), id="plugin-value-only"),
]


@pytest.mark.parametrize("kind", list(POSES))
@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("sizes", [[7], [3, 1, 5]], ids=["one-compound", "three-compounds"])
def test_every_chunking_matches_the_full_graph(
    kind: str, combination: combframe.Combination, sizes: list[int]
) -> None:
    build, make, collate = POSES[kind]
    poses = make(sum(sizes))
    base = build(0)
    flat = None if len(sizes) == 1 else sizes
    streams = isinstance(combination, combframe.StreamingCombination)
    for loss_kind in LOSSES:
        loss = make_loss(loss_kind)
        want = full_graph_gradients(copy.deepcopy(base), combination, poses, loss, sizes=flat)
        for strategy in STRATEGIES:
            for chunk in (1, 3, sum(sizes)):
                case = f"{strategy}/{loss_kind}/chunk={chunk}"
                if strategy == "stream" and (not streams or loss_kind != "combined"):
                    with pytest.raises(combframe.StrategyError):
                        multipose_gradients(
                            copy.deepcopy(base), combination, poses, loss, strategy,
                            sizes=flat, chunk_size=chunk, collate=collate,
                        )  # fmt: skip
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", combframe.StrategyWarning)
                    got = multipose_gradients(
                        copy.deepcopy(base), combination, poses, loss, strategy,
                        sizes=flat, chunk_size=chunk, collate=collate,
                    )  # fmt: skip
                assert rel_err([got[0]], [want[0]]) <= RTOL, f"{case}: combined"
                assert rel_err([got[1]], [want[1]]) <= RTOL, f"{case}: per-pose"
                assert rel_err(got[2], want[2]) <= RTOL, f"{case}: gradients"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    chunk=st.integers(1, 8),
    strategy=st.sampled_from(STRATEGIES),
    name=st.sampled_from(["max", "mean", "boltzmann"]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_and_chunks_are_exact(
    sizes: list[int], chunk: int, strategy: str, name: str, seed: int
) -> None:
    combination = combframe.create_combination(name)
    base = make_mlp(seed=seed % 7)
    poses = tensor_poses(sum(sizes), seed)
    loss = make_loss("combined" if strategy == "stream" else "both")
    want = full_graph_gradients(copy.deepcopy(base), combination, poses, loss, sizes=sizes)
    got = multipose_gradients(
        copy.deepcopy(base), combination, poses, loss, strategy, sizes=sizes, chunk_size=chunk
    )
    assert rel_err(got[2], want[2]) <= RTOL
    assert rel_err([got[0]], [want[0]]) <= RTOL


# ---- the batched call ----------------------------------------------------------------------
def test_forward_compounds_returns_combined_per_pose_and_index() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "mean", chunk_size=4)
    compounds = [tensor_poses(2, 1), tensor_poses(3, 2)]
    out = model.forward_compounds(compounds)
    assert isinstance(out, combframe.CompoundPredictions)
    combined, per_pose, index = out
    assert combined.shape == (2,) and per_pose.shape == (5,)
    assert index.tolist() == [0, 0, 1, 1, 1] and index.dtype == torch.long
    torch.testing.assert_close(combined, torch.stack([per_pose[:2].mean(), per_pose[2:].mean()]))
    # the same through forward(compounds=...), the route DDP's forward takes
    again = model(compounds=compounds)
    torch.testing.assert_close(again.combined, combined)
    # a single compound gives the unbatched answer
    one, per = model(compounds[1])
    torch.testing.assert_close(one, combined[1])
    torch.testing.assert_close(per, per_pose[2:])


def test_batched_call_errors_name_the_problem() -> None:
    model = combframe.MultiPoseModel(make_mlp(), "mean")
    with pytest.raises(TypeError, match="neither"):
        model()
    with pytest.raises(TypeError, match="both"):
        model(tensor_poses(2), compounds=[tensor_poses(2)])
    with pytest.raises(combframe.CombinationError, match="compounds is empty"):
        model(compounds=[])
    with pytest.raises(combframe.CombinationError, match=r"compounds \[1\] have no poses"):
        model(compounds=[tensor_poses(2), []])
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=rf"chunk_size must be an integer >= 1.*{bad!r}"):
            combframe.MultiPoseModel(make_mlp(), "mean", chunk_size=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="collate must be callable"):
        combframe.MultiPoseModel(make_mlp(), "mean", collate="stack")  # type: ignore[arg-type]


def test_a_model_that_returns_the_wrong_count_per_chunk_is_refused() -> None:
    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1).double()

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x).sum()  # sums the whole chunk: one value, not one per pose

    model = combframe.MultiPoseModel(Pooled(), "mean", strategy="recompute", chunk_size=3)
    with pytest.raises(combframe.CombinationError, match=r"shape \(\).*chunk of poses 0\.\.2"):
        model(tensor_poses(5))


def test_no_grad_runs_chunks_without_graphs() -> None:
    net = make_mlp()
    model = combframe.MultiPoseModel(net, "boltzmann", strategy="recompute", chunk_size=3)
    poses = tensor_poses(7)
    with torch.no_grad():
        combined, per_pose = model(poses)
    assert combined.grad_fn is None and per_pose.grad_fn is None
    want = torch.stack([net(p).reshape(()) for p in poses]).detach()
    torch.testing.assert_close(per_pose, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("training", [False, True])
def test_a_model_built_under_inference_mode_predicts_there(strategy: str, training: bool) -> None:
    # Its parameters and buffers are inference tensors, which keep no version counter.
    with torch.inference_mode():
        net = Normed().train(training)
        model = combframe.MultiPoseModel(net, "boltzmann", strategy=strategy, chunk_size=3)
        poses = tensor_poses(6)
        want = torch.cat([net(torch.stack(poses[s : s + 3])) for s in (0, 3)])
        stats = [b.clone() for b in net.buffers()]
        _, per_pose = model(poses)
    torch.testing.assert_close(per_pose, want, rtol=1e-12, atol=0)
    if training:  # each chunk updated the statistics once, as the loop above did
        assert any(not torch.equal(a, b) for a, b in zip(stats, net.buffers(), strict=True))


# ---- default collate -------------------------------------------------------------------
def test_default_collate_stacks_leaf_by_leaf() -> None:
    poses = [
        {"x": torch.full((2, 3), float(i)), "meta": (torch.tensor(i), [torch.ones(1) * i])}
        for i in range(4)
    ]
    batch = combframe.default_collate(poses)
    assert batch["x"].shape == (4, 2, 3)
    assert batch["meta"][0].tolist() == [0, 1, 2, 3]
    assert batch["meta"][1][0].shape == (4, 1)
    assert combframe.default_collate([1, 2]).tolist() == [1, 2]
    assert combframe.default_collate(["a", "b"]) == ["a", "b"]


def test_default_collate_refuses_unequal_poses_and_says_what_to_do() -> None:
    with pytest.raises(combframe.CombinationError, match=r"\(3, 2\).*pose 1.*\(4, 2\).*collate="):
        combframe.default_collate([torch.zeros(3, 2), torch.zeros(4, 2)])
    with pytest.raises(combframe.CombinationError, match=r"keys \['a'\].*\['b'\]"):
        combframe.default_collate([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(combframe.CombinationError, match="tuple of length 2"):
        combframe.default_collate([(torch.zeros(1), torch.zeros(1)), (torch.zeros(1),)])
    model = combframe.MultiPoseModel(GraphModel(), "mean", strategy="recompute", chunk_size=2)
    with pytest.raises(combframe.CombinationError, match="collate="):
        model(make_graph_poses(3, atoms=7))


def test_default_collate_builds_a_pyg_batch() -> None:
    pyg = pytest.importorskip("torch_geometric.data")
    data = [
        pyg.Data(x=torch.randn(n, 3), edge_index=torch.zeros(2, 0, dtype=torch.long))
        for n in (2, 5)
    ]
    batch = combframe.default_collate(data)
    assert isinstance(batch, pyg.Batch) and batch.num_graphs == 2


class PygEnergy(torch.nn.Module):
    """Per-atom energy from features and positions, summed per graph of a PyG batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 1).double()

    def forward(self, data: Any) -> Tensor:
        atom = torch.tanh(self.lin(torch.cat([data.x, data.pos], -1))).squeeze(-1)
        if data.batch is None:
            return atom.sum().reshape(1)
        return torch.zeros(data.num_graphs, dtype=atom.dtype).index_add(0, data.batch, atom)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pyg_poses_run_in_chunks_with_forces(strategy: str) -> None:
    pyg = pytest.importorskip("torch_geometric.data")
    gen = torch.Generator().manual_seed(0)

    def poses() -> list[Any]:
        gen.manual_seed(0)
        return [
            pyg.Data(
                x=torch.randn(n, 3, generator=gen, dtype=torch.float64),
                pos=torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_(),
            )
            for n in (3, 5, 2, 4, 6)
        ]

    net, comb, loss = PygEnergy(), BoltzmannCombination(), make_loss("combined")
    ref_poses, got_poses = poses(), poses()
    want = full_graph_gradients(copy.deepcopy(net), comb, ref_poses, loss, sizes=[2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        got = multipose_gradients(net, comb, got_poses, loss, strategy, sizes=[2, 3], chunk_size=2)
    assert rel_err(got[2], want[2]) <= RTOL
    forces = [p.pos.grad for p in got_poses]
    assert rel_err(forces, [p.pos.grad for p in ref_poses]) <= RTOL


# ---- store: per-sample gradients or one pose per pass ------------------------------------
def test_store_vmaps_stackable_poses_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combframe.MultiPoseModel(make_mlp(), "mean", strategy="store", chunk_size=4)(
            tensor_poses(9)
        )[0].backward()


class ScaledByPose(torch.nn.Module):
    """Features scaled by a tensor of the pose: the model's own ``scale`` in some poses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1).double()
        self.scale = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))

    def forward(self, pose: tuple[Tensor, Tensor]) -> Tensor:
        x, s = pose
        out: Tensor = self.lin((x * (1 + s.reshape(*x.shape[:-2], 1, 4))).reshape(-1, 4))
        return out.reshape(-1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_parameter_held_by_some_poses_gets_its_gradient_through_them(strategy: str) -> None:
    """Not only when pose 0 holds it: store's per-sample pass would not see that path."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 4, generator=gen, dtype=torch.float64) for _ in range(5)]

    def poses(net: ScaledByPose) -> list[tuple[Tensor, Tensor]]:
        none = torch.zeros(4, dtype=torch.float64)
        return [(x, net.scale if i in (1, 3) else none) for i, x in enumerate(xs)]

    ref = ScaledByPose()
    loss = make_loss("combined")
    want = full_graph_gradients(ref, MeanCombination(), poses(ref), loss, chunk_size=2)
    net = ScaledByPose()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.errors.StrategyWarning)
        got = multipose_gradients(net, MeanCombination(), poses(net), loss, strategy, chunk_size=2)
    assert net.scale.grad is not None
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=0)


def _graph_store() -> combframe.MultiPoseModel:
    return combframe.MultiPoseModel(
        graph_model(), "mean", strategy="store", chunk_size=3, collate=graph_collate
    )


def _dropout_store() -> combframe.MultiPoseModel:
    net = torch.nn.Sequential(make_mlp(), torch.nn.Dropout(0.5))
    return combframe.MultiPoseModel(net, "mean", strategy="store", chunk_size=3)


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_graph_store, "custom collate"), (_dropout_store, "vmap failed")],
    ids=["graph-collate", "dropout"],
)
def test_store_falls_back_to_one_pose_per_pass_and_warns_once(
    make: Callable[[], combframe.MultiPoseModel], reason: str
) -> None:
    model = make()
    poses = graph_poses(5) if "collate" in reason else tensor_poses(5)
    with pytest.warns(combframe.StrategyWarning, match=f"one pose per pass.*{reason}"):
        model(poses)[0].backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(poses)[0].backward()  # once per model


def test_store_detects_a_parameter_vmap_cannot_see() -> None:
    class Hidden(torch.nn.Module):
        """Uses its weight through a list, which torch.func.functional_call cannot swap."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1).double()
            self.hidden = [self.lin.weight]

        def forward(self, x: Tensor) -> Tensor:
            return (x @ self.hidden[0].t() + self.lin.bias).sum(dim=(-2, -1))

    base = Hidden()
    poses = tensor_poses(6)
    loss = make_loss("both")
    want = full_graph_gradients(copy.deepcopy(base), MeanCombination(), poses, loss)
    with pytest.warns(combframe.StrategyWarning, match="other than through its registered name"):
        got = multipose_gradients(base, MeanCombination(), poses, loss, "store", chunk_size=3)
    assert rel_err(got[2], want[2]) <= RTOL


def test_store_detects_a_closure_parameter_that_the_first_pose_leaves_inactive() -> None:
    """The alias is found in the graph's structure, not by a pose's numbers."""

    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1).double()
            weight = self.lin.weight
            self.gate = lambda x: torch.relu(x @ weight.t())  # holds the parameter

        def forward(self, x: Tensor) -> Tensor:
            return (self.lin(x) + self.gate(x)).sum(dim=(-2, -1))

    def build() -> Gate:  # deepcopy would leave the copy's closure on the original weight
        torch.manual_seed(0)
        return Gate()

    base = build()
    with torch.no_grad():
        poses = sorted(tensor_poses(8), key=lambda p: float((p @ base.lin.weight.t()).sum()))
        assert float((poses[0] @ base.lin.weight.t()).sum()) < 0  # pose 0: the gate is off
    loss = make_loss("both")
    want = full_graph_gradients(build(), MeanCombination(), poses, loss)
    with pytest.warns(combframe.StrategyWarning, match="other than through its registered name"):
        got = multipose_gradients(base, MeanCombination(), poses, loss, "store", chunk_size=4)
    assert rel_err(got[2], want[2]) <= RTOL


def test_a_given_collate_is_used_with_chunk_size_one() -> None:
    net = graph_model()
    poses = graph_poses(4)
    model = combframe.MultiPoseModel(net, "mean", strategy="recompute", collate=graph_collate)
    combined, per_pose = model(poses)  # the model only understands collated batches
    want = torch.stack([net(p).reshape(()) for p in poses])
    torch.testing.assert_close(per_pose, want.detach(), rtol=1e-12, atol=0)
    combined.backward()


class MixesPoses(torch.nn.Module):
    """Subtracts half the batch mean: its output depends on the other poses of a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - 0.5 * x.mean(0)).sum(dim=(-2, -1))


def test_store_refuses_a_model_that_mixes_the_poses_of_a_batch() -> None:
    model = combframe.MultiPoseModel(MixesPoses(), "mean", strategy="store", chunk_size=3).eval()
    with pytest.raises(combframe.CombinationError, match=r"mixes the poses of a batch.*recompute"):
        model(tensor_poses(6))
    # recompute and stream run whole chunks: the chunk is part of the model
    for strategy in ("recompute", "stream"):
        combframe.MultiPoseModel(MixesPoses(), "mean", strategy=strategy, chunk_size=3)(
            tensor_poses(6)
        )[0].backward()


def test_store_names_the_batch_a_buffer_writing_model_mixes_poses_in() -> None:
    # Batch norm over a pose's rows (3 per pose), updating its statistics: pose 0 alone
    # is compared with pose 0 in the batch of poses 0..1 (pose 1 alone starts from the
    # statistics pose 0 left).
    class RowNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 4).double()
            self.norm = torch.nn.BatchNorm1d(4).double()

        def forward(self, x: Tensor) -> Tensor:
            h = self.norm(self.lin(x).reshape(-1, 4)).reshape(*x.shape[:-1], 4)
            return h.tanh().sum(dim=(-2, -1))

    poses = [torch.randn(3, 5, dtype=torch.float64) for _ in range(4)]
    model = combframe.MultiPoseModel(RowNorm(), "mean", strategy="store", chunk_size=2)
    with (
        pytest.warns(combframe.StrategyWarning, match="updates buffers"),
        pytest.raises(
            combframe.CombinationError, match=r"for pose 0 in the batch of poses 0\.\.1 "
        ),
    ):
        model(poses)


def test_store_explains_a_model_that_fails_on_a_batch_of_one() -> None:
    model = combframe.MultiPoseModel(Normed(), "mean", strategy="store", chunk_size=3)
    with pytest.raises(combframe.CombinationError, match=r"runs pose 0 alone.*recompute"):
        model(tensor_poses(6))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parameters_changed_between_forward_and_backward_are_refused(strategy: str) -> None:
    net = make_mlp()
    combined, _ = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=2)(
        tensor_poses(4)
    )
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # an optimizer step before backward
    with pytest.raises(combframe.CombinationError, match="modified in place after the forward"):
        combined.backward()
    assert all(p.grad is None for p in net.parameters())


# ---- gradients to everything the graph reaches ---------------------------------------------
class Forces(torch.nn.Module):
    """Energy of a pose from its positions: a pair potential with learnable strength."""

    def __init__(self) -> None:
        super().__init__()
        self.strength = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.lin = torch.nn.Linear(3, 4).double()

    def forward(self, pos: Tensor) -> Tensor:
        d = (pos.unsqueeze(-2) - pos.unsqueeze(-3)).pow(2).sum(-1)
        return self.strength * torch.exp(-d).sum(dim=(-2, -1)) + torch.tanh(self.lin(pos)).sum(
            dim=(-2, -1)
        )


def _positions(n: int, atoms: int = 4) -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(atoms, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(n)
    ]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_pose_tensors_that_require_grad_receive_their_gradients(strategy: str, chunk: int) -> None:
    sizes = [3, 4]
    loss = make_loss("combined" if strategy == "stream" else "both")
    comb = BoltzmannCombination(kT=0.5)
    ref_pos, pos = _positions(7), _positions(7)
    net = Forces()
    want = full_graph_gradients(copy.deepcopy(net), comb, ref_pos, loss, sizes=sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        got = multipose_gradients(net, comb, pos, loss, strategy, sizes=sizes, chunk_size=chunk)
    assert rel_err(got[2], want[2]) <= RTOL
    assert rel_err([p.grad for p in pos], [p.grad for p in ref_pos]) <= RTOL  # type: ignore[misc]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_pose_tensor_shared_by_several_poses_gets_the_sum(strategy: str) -> None:
    protein = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ligands = _positions(5, atoms=2)
    poses = [torch.cat([protein, lig]) for lig in ligands]  # non-leaf, built from protein

    def run(wrapped: Callable[[list[Tensor]], tuple[Tensor, Tensor]]) -> list[Tensor]:
        protein.grad = None
        for lig in ligands:
            lig.grad = None
        combined, _ = wrapped(poses)
        (combined**2).backward()
        return [protein.grad.clone(), *(lig.grad.clone() for lig in ligands)]  # type: ignore[union-attr]

    net = Forces()
    comb = MeanCombination()

    def reference(ps: list[Tensor]) -> tuple[Tensor, Tensor]:
        y = torch.stack([net(p) for p in ps])
        return comb.value(y), y

    want = run(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)  # store: pose by pose
        got = run(combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=2))
    assert rel_err(got, want) <= RTOL


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [1, 4])
def test_gradients_continue_into_an_upstream_encoder(strategy: str, chunk: int) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 5).double()
    raw = [torch.randn(1, 3, dtype=torch.float64) for _ in range(6)]
    net = make_mlp()
    comb = MaxCombination(pred_scale=2.0)

    def step(use: str) -> list[Tensor]:
        encoder.zero_grad(set_to_none=True)
        net.zero_grad(set_to_none=True)
        poses = [encoder(r) for r in raw]
        if use == "reference":
            combined = comb.value(torch.stack([net(p).reshape(()) for p in poses]))
        else:
            combined, _ = combframe.MultiPoseModel(net, comb, strategy=use, chunk_size=chunk)(poses)
        ((combined - 1.0) ** 2).backward()
        return [p.grad.clone() for p in (*encoder.parameters(), *net.parameters())]  # type: ignore[union-attr]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)  # store: pose by pose
        assert rel_err(step(strategy), step("reference")) <= RTOL


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_a_parameter_captured_by_a_readout_closure_gets_its_gradient(
    strategy: str, chunk: int
) -> None:
    scale = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    net = make_mlp()
    comb = BoltzmannCombination()
    poses = tensor_poses(5)

    def grads(use: str) -> list[Tensor]:
        scale.grad = None
        net.zero_grad(set_to_none=True)
        if use == "reference":
            combined = comb.value(torch.stack([scale * net(p).reshape(()) for p in poses]))
        else:
            model = combframe.MultiPoseModel(
                net, comb, strategy=use, chunk_size=chunk, pred_readout=lambda y: scale * y
            )
            combined, _ = model(poses)
        combined.backward()
        return [scale.grad.clone(), *(p.grad.clone() for p in net.parameters())]  # type: ignore[union-attr]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        assert rel_err(grads(strategy), grads("reference")) <= RTOL


def test_a_frozen_model_with_a_trainable_closure_still_gets_gradients() -> None:
    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    net = make_mlp().requires_grad_(False)
    model = combframe.MultiPoseModel(net, "mean", pred_readout=lambda y: scale * y)
    poses = tensor_poses(3)
    combined, _ = model(poses)
    combined.backward()
    want = torch.stack([net(p).reshape(()) for p in poses]).mean()
    torch.testing.assert_close(scale.grad, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_captured_tensor_from_outside_is_refused_by_name(strategy: str) -> None:
    upstream = torch.nn.Linear(1, 1).double()
    offset = upstream(torch.ones(1, 1, dtype=torch.float64)).reshape(())  # non-leaf
    net = make_mlp()
    model = combframe.MultiPoseModel(
        net, "mean", strategy=strategy, pred_readout=lambda y: y + offset
    )
    with pytest.raises(
        combframe.CombinationError,
        match=r"outside the model.*ViewBackward0 -> a torch.float64 leaf of shape \(1, 1\)",
    ):
        model(tensor_poses(3))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_order_gradients_raise_instead_of_coming_out_first_order(strategy: str) -> None:
    net = make_mlp()
    combined, _ = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=2)(
        tensor_poses(4)
    )
    with pytest.raises(combframe.StrategyError, match=r"second-order.*create_graph=True"):
        torch.autograd.grad(combined, list(net.parameters()), create_graph=True)
    assert all(p.grad is None for p in net.parameters())


def test_second_order_through_the_combination_alone_is_exact() -> None:
    """Hessian-vector products in the predictions are ordinary autograd (no model graph)."""
    model = combframe.MultiPoseModel(make_mlp(), "boltzmann", chunk_size=2)
    per_pose = model(tensor_poses(4))[1].detach().requires_grad_()
    combination = model.combination
    index = torch.zeros(4, dtype=torch.long)
    g = torch.autograd.grad(
        combination.segment_value(per_pose, index, 1).sum(), per_pose, create_graph=True
    )[0]
    hess = torch.autograd.functional.hessian(combination.value, per_pose.detach())
    torch.testing.assert_close(torch.autograd.grad(g.sum(), per_pose)[0], hess.sum(0))


# ---- batch norm: chunking is part of the model's meaning -----------------------------------
class Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 4).double()
        self.norm = torch.nn.BatchNorm1d(4).double()
        self.out = torch.nn.Linear(4, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x.reshape(-1, 5))
        return self.out(torch.tanh(self.norm(h))).reshape(-1)


@pytest.mark.parametrize("strategy", ["recompute", "stream"])
def test_batch_norm_in_training_matches_the_full_graph_run_in_the_same_chunks(
    strategy: str,
) -> None:
    """Batch statistics mix the poses of a chunk: the chunks are part of the model."""
    torch.manual_seed(0)
    base = Normed()
    poses = tensor_poses(6)
    loss = make_loss("combined")
    comb = MeanCombination()
    ref = copy.deepcopy(base)
    want = full_graph_gradients(ref, comb, poses, loss, chunk_size=3)
    got_model = copy.deepcopy(base)
    got = multipose_gradients(got_model, comb, poses, loss, strategy, chunk_size=3)
    assert rel_err(got[2], want[2]) <= RTOL
    assert rel_err([got[1]], [want[1]]) <= RTOL
    # running statistics updated once per chunk, as in the reference
    torch.testing.assert_close(
        got_model.norm.running_mean, ref.norm.running_mean, rtol=1e-12, atol=0
    )
    assert int(got_model.norm.num_batches_tracked) == 2
    # and not what the unchunked full graph gives
    whole = full_graph_gradients(copy.deepcopy(base), comb, poses, loss, chunk_size=6)
    assert rel_err(got[2], whole[2]) > 1e-3


# ---- segment reductions ----------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    scale=st.sampled_from([1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_segment_reductions_match_per_segment_torch(
    sizes: list[int], scale: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    parts = x.split(sizes)
    c = len(sizes)
    torch.testing.assert_close(segment_sum(x, index, c), torch.stack([p.sum() for p in parts]))
    torch.testing.assert_close(segment_mean(x, index, c), torch.stack([p.mean() for p in parts]))
    torch.testing.assert_close(segment_max(x, index, c), torch.stack([p.max() for p in parts]))
    torch.testing.assert_close(
        segment_logsumexp(x, index, c), torch.stack([torch.logsumexp(p, 0) for p in parts])
    )
    torch.testing.assert_close(
        segment_softmax(x, index, c), torch.cat([torch.softmax(p, 0) for p in parts])
    )


def test_a_value_only_plugin_evaluates_compounds_one_by_one() -> None:
    comb = SoftAbsMeanCombination()
    y = torch.randn(6, dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    want = torch.stack([comb.value(p) for p in y.split([2, 1, 3])])
    torch.testing.assert_close(comb.segment_value(y, index, 3), want)


def test_shipped_combinations_agree_between_value_and_segment_value() -> None:
    y = 3 * torch.randn(9, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for comb in (
        MaxCombination(),
        MaxCombination(False, 2.0),
        MeanCombination(),
        BoltzmannCombination(0.3),
    ):
        want = torch.stack([comb.value(p) for p in y.split([3, 2, 4])])
        torch.testing.assert_close(comb.segment_value(y, index, 3), want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("on_host", [True, False], ids=["host-bookkeeping", "device-bookkeeping"])
@pytest.mark.parametrize("chunk", [1, 3, 12])
@pytest.mark.parametrize("name", ["max", "boltzmann"])
def test_stream_bookkeeping_paths_agree_in_chunks(on_host: bool, chunk: int, name: str) -> None:
    """The CPU's float bookkeeping and the device's tensor bookkeeping, on spread values."""
    combination = combframe.create_combination(
        name, **({"pred_scale": 50.0} if name == "max" else {})
    )
    base = make_mlp(seed=3)
    poses = [5.0 * p for p in tensor_poses(12, seed=5)]  # predictions spread over tens
    sizes = [4, 1, 7]
    loss = make_loss("combined")
    want = full_graph_gradients(copy.deepcopy(base), combination, poses, loss, sizes=sizes)
    with mock.patch.object(strategies_module, "_host_scalars", return_value=on_host):
        got = multipose_gradients(
            base, combination, poses, loss, "stream", sizes=sizes, chunk_size=chunk
        )
    assert rel_err(got[2], want[2]) <= RTOL


# ---- poses as objects; readouts; autocast; probes ---------------------------------------
@dataclasses.dataclass
class AtomPose:
    x: Tensor
    label: str = "pose"


class AtomNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 1).double()

    def forward(self, pose: AtomPose) -> Tensor:
        return torch.tanh(self.lin(pose.x)).sum(dim=(-2, -1))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_dataclass_poses_are_looked_into(strategy: str, chunk: int) -> None:
    def poses() -> list[AtomPose]:
        return [AtomPose(p.clone().requires_grad_()) for p in tensor_poses(5, seed=2)]

    net, comb = AtomNet(), BoltzmannCombination()
    ref, got = poses(), poses()
    comb.value(torch.stack([net(p) for p in ref])).backward()
    want = [p.x.grad for p in ref]
    net.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        combined, _ = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=chunk)(got)
    combined.backward()
    assert rel_err([p.x.grad for p in got], want) <= RTOL  # type: ignore[misc]


class Opaque:
    """A pose object combframe cannot look into."""

    def __init__(self, x: Tensor) -> None:
        self.x = x


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_leaf_hidden_in_an_opaque_pose_raises_instead_of_losing_gradients(strategy: str) -> None:
    net = AtomNet()
    poses = [Opaque(p.clone().requires_grad_()) for p in tensor_poses(3)]
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy)
    with pytest.raises(combframe.CombinationError, match=r"not reached by the first chunk"):
        combined, _ = model(poses)  # type: ignore[arg-type]
        combined.backward()  # recompute meets the other poses' graphs in backward


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_closure_reached_by_some_poses_only_is_exact_or_raises(strategy: str) -> None:
    extra = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    net = make_mlp()

    def readout(y: Tensor) -> Tensor:
        return y * extra if bool(y.detach().sum() > 0) else y

    with torch.no_grad():
        poses = sorted(tensor_poses(8, seed=11), key=lambda p: float(net(p).sum()))
        assert float(net(poses[0]).sum()) <= 0 < float(net(poses[-1]).sum())
    # recompute walks its last chunk first, store and stream their first.
    reaching_first, reaching_later = (poses, poses[::-1])[:: 1 if strategy == "recompute" else -1]
    # The pose walked first reaches `extra` (found), others may not: exact.
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy, pred_readout=readout)
    combined, _ = model(reaching_first)
    combined.backward()
    with torch.no_grad():
        positive = [float(net(p).sum()) for p in poses if float(net(p).sum()) > 0]
    torch.testing.assert_close(extra.grad, torch.tensor(sum(positive) / 8, dtype=torch.float64))
    # The pose walked first does not reach `extra`, another one does: an error.
    with pytest.raises(combframe.CombinationError, match="not reached by the first chunk"):
        combined, _ = model(reaching_later)
        combined.backward()


def test_comb_readout_sees_the_0d_combined_value_of_one_compound() -> None:
    net = make_mlp()
    poses = tensor_poses(3)
    model = combframe.MultiPoseModel(net, "mean", comb_readout=lambda g: torch.stack([g, -g]))
    combined, _ = model(poses)
    assert combined.shape == (2,)
    squeezed = combframe.MultiPoseModel(net, "mean", comb_readout=lambda g: g.squeeze())
    assert squeezed(poses)[0].shape == ()
    batch = model(compounds=[poses, poses[:2]])
    assert batch.combined.shape == (2, 2)  # the readout sees the (C,) vector


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_closure_parameter_under_autocast_is_not_mistaken_for_a_captured_tensor(
    strategy: str,
) -> None:
    extra = torch.nn.Linear(1, 1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 1), torch.nn.Flatten(0))
    model = combframe.MultiPoseModel(
        net, "mean", strategy=strategy, chunk_size=2, pred_readout=lambda y: extra(y[:, None])
    )
    poses = [p.float() for p in tensor_poses(5)]
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore", combframe.StrategyWarning)
        for _ in range(2):  # the second call meets autocast's cached casts
            combined, _ = model(poses)
            combined.float().backward()
    assert extra.weight.grad is not None and bool(extra.weight.grad.ne(0).all())


class SumAll(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.sum()


def test_the_probe_of_a_frozen_model_leaves_buffers_and_rng_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3))
    frozen = torch.nn.Sequential(net, torch.nn.Linear(4, 1), SumAll()).double()
    frozen.requires_grad_(False)
    poses = [p.reshape(1, 5).expand(2, 5).contiguous() for p in tensor_poses(3)]
    torch.manual_seed(0)
    combframe.MultiPoseModel(frozen, "mean")(poses)
    after = torch.rand(1)
    assert int(net[1].num_batches_tracked) == 3
    torch.manual_seed(0)
    for p in poses:
        frozen(p)
    assert torch.equal(torch.rand(1), after)  # the RNG advanced as by one pass over the poses
