"""The models people really train: hooks, spectral norm, shared buffers, forces, memory.

Each case is checked against the float64 full graph (every pose's graph kept, one
backward) to 1e-10, or must be refused before any ``.grad`` or buffer is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from combframe_max import MaxCombination
from combframe_mean import MeanCombination
from torch import Tensor

import combframe
from combframe.testing import peak_tensor_bytes
from tests.test_batched import MixesPoses

RTOL = 1e-10
STRATEGIES = ("store", "recompute", "stream")


def rel_err(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    scale = max(max(float(w.abs().max()) for w in want if w.numel()), 1e-300)
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) / scale


def grads(model: torch.nn.Module) -> list[Tensor]:
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
    ]


def atom_poses(n: int, atoms: int = 3, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((atoms, 5), generator=gen, dtype=torch.float64) for _ in range(n)]


class Scaled(torch.nn.Module):
    """Batch norm over a pose's atoms, then a constant buffer that ``mul`` saves."""

    def __init__(self, big: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 4).double()
        self.norm = torch.nn.BatchNorm1d(4).double()
        self.out = torch.nn.Linear(4, 1).double()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        self.register_buffer("big", torch.zeros(big, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, x.shape[-2], 5)  # one pose (atoms, 5) or a chunk (b, atoms, 5)
        h = self.norm(self.lin(x).reshape(-1, 4)).reshape(*x.shape[:2], 4) * self.scale
        return self.out(torch.tanh(h)).sum(dim=(-2, -1)) + 0.0 * self.big.sum()


def full_graph(
    model: Callable[[Any], Tensor], poses: Sequence[Any], comb: combframe.Combination
) -> Tensor:
    per_pose = torch.stack([model(p).reshape(()) for p in poses])
    return comb.value(per_pose)


# ---- buffers are never written back in place -----------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_forwards_then_one_backward_match_the_full_graph(strategy: str, mode: str) -> None:
    comb = MeanCombination()
    a, b = atom_poses(4, seed=1), atom_poses(5, seed=2)
    ref = getattr(Scaled(), mode)()
    (full_graph(ref, a, comb) + 2 * full_graph(ref, b, comb)).backward()
    net = getattr(Scaled(), mode)()
    model = combframe.MultiPoseModel(net, comb, strategy=strategy)
    (model(a)[0] + 2 * model(b)[0]).backward()
    assert rel_err(grads(net), grads(ref)) <= RTOL
    for got, want in zip(net.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_plain_term_computed_earlier_survives_the_forward_and_backward(strategy: str) -> None:
    comb = MeanCombination()
    x, poses = atom_poses(1, seed=3)[0], atom_poses(6, seed=4)
    ref = Scaled().eval()
    (ref(x) + full_graph(ref, poses, comb)).backward()
    net = Scaled().eval()
    model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=3)
    before = [b._version for b in net.buffers()]
    plain = net(x)  # saves the scale buffer (and the statistics, in eval)
    combined, _ = model(poses)
    (plain + combined).backward()
    assert [b._version for b in net.buffers()] == before
    assert rel_err(grads(net), grads(ref)) <= RTOL


# ---- recompute's memory does not grow with N in training mode -------------------
def test_recompute_keeps_no_copy_of_an_unchanged_buffer_per_chunk() -> None:
    def peak(n: int) -> int:
        net = Scaled(big=1 << 19).train()  # a 4 MiB constant buffer
        model = combframe.MultiPoseModel(net, "mean", strategy="recompute")
        poses = atom_poses(n)

        def step() -> None:
            model(poses)[0].backward()

        return peak_tensor_bytes(step)

    small, large = peak(4), peak(32)
    assert large - small < (1 << 20), (small, large)  # not 28 more copies of 4 MiB


# ---- a pose changed in place after the forward is refused by every strategy ----
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_refuses_a_pose_changed_in_place_after_the_forward(
    strategy: str, chunk: int
) -> None:
    net = Scaled().eval()
    poses = atom_poses(4)
    combined, _ = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=chunk)(poses)
    poses[2].mul_(2.0)
    with pytest.raises(combframe.StrategyError, match=r"pose 2 .*modified in place.*version"):
        combined.backward()
    assert all(p.grad is None for p in net.parameters())


# ---- store's per-sample path and models that update buffers in place -------------
class Spectral(torch.nn.Module):
    """A spectrally normalised layer: its power iteration updates buffers in training."""

    def __init__(self, old_api: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = torch.nn.utils.spectral_norm
        if not old_api:
            norm = torch.nn.utils.parametrizations.spectral_norm
        self.lin = norm(torch.nn.Linear(5, 4).double())
        self.out = torch.nn.Linear(4, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.lin(x))).sum(dim=(-2, -1))


@pytest.mark.parametrize("old_api", [False, True])
def test_store_in_chunks_on_spectral_norm_matches_the_full_graph(old_api: bool) -> None:
    poses = [p[:1] for p in atom_poses(7, seed=5)]
    ref = Spectral(old_api).train()
    full_graph(ref, poses, MeanCombination()).backward()
    net = Spectral(old_api).train()
    model = combframe.MultiPoseModel(net, "mean", strategy="store", chunk_size=3)
    with pytest.warns(combframe.errors.StrategyWarning, match="updates buffers in place"):
        model(poses)[0].backward()
    assert rel_err(grads(net), grads(ref)) <= RTOL
    for got, want in zip(net.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_a_failed_per_sample_attempt_leaves_the_buffers_as_they_were() -> None:
    """A buffer written only by the vmapped call is found, and the model's is untouched."""

    class CountsCalls(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1).double()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            if torch._C._functorch.is_functorch_wrapped_tensor(x):  # under vmap only
                with torch.no_grad():
                    torch.add(self.calls, 1.0, out=self.calls)
            return self.lin(x).sum(dim=(-2, -1))

    poses = [p[:1] for p in atom_poses(5)]
    ref = CountsCalls()
    full_graph(ref, poses, MeanCombination()).backward()
    net = CountsCalls()
    with pytest.warns(combframe.errors.StrategyWarning, match="updates buffers in place"):
        combframe.MultiPoseModel(net, "mean", strategy="store", chunk_size=3)(poses)[0].backward()
    assert float(net.calls) == 0.0
    assert rel_err(grads(net), grads(ref)) <= RTOL


# ---- gradient hooks -------------------------------------------------------------
class Plain(torch.nn.Module):
    """Poses ``(1, 5)``, chunks ``(b, 1, 5)``; optionally a clamp hook on an activation."""

    def __init__(self, hook: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 4).double()
        self.out = torch.nn.Linear(4, 1).double()
        self.hook = hook
        if hook == "module":
            self.out.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(-0.02, 0.02),))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        if self.hook == "tensor" and h.requires_grad:
            h.register_hook(lambda g: g.clamp(-0.02, 0.02))
        return self.out(h).sum(dim=(-2, -1))


def hook_parameters(net: torch.nn.Module) -> None:
    net.lin.weight.register_hook(lambda g: 3 * g)
    net.out.weight.register_hook(lambda g: g.clamp(-0.05, 0.05))


def row_poses(n: int, seed: int = 0) -> list[Tensor]:
    return [p[:1] * 3 for p in atom_poses(n, seed=seed)]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_parameter_hook_runs_once_on_the_total_gradient(strategy: str, chunk: int) -> None:
    poses = row_poses(5)
    comb = MaxCombination(negate_preds=True, pred_scale=2.0)
    ref = Plain()
    hook_parameters(ref)
    full_graph(ref, poses, comb).backward()
    net = Plain()
    hook_parameters(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.errors.StrategyWarning)
        model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=chunk)
        model(poses)[0].backward()
    assert rel_err(grads(net), grads(ref)) <= RTOL


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("hook", ["tensor", "module"])
def test_recompute_honours_hooks_on_activations(hook: str, chunk: int) -> None:
    poses = row_poses(6, seed=1)
    comb = MaxCombination(negate_preds=True, pred_scale=2.0)
    ref = Plain(hook)
    if chunk == 1:
        full_graph(ref, poses, comb).backward()
    else:
        per_pose = torch.cat([ref(torch.stack(poses[s : s + 2])) for s in range(0, 6, 2)])
        comb.value(per_pose).backward()
    net = Plain(hook)
    model = combframe.MultiPoseModel(net, comb, strategy="recompute", chunk_size=chunk)
    model(poses)[0].backward()
    assert rel_err(grads(net), grads(ref)) <= RTOL
    # the hook changes the result: a strategy that skipped it would be caught
    plain = Plain()
    full_graph(plain, poses, comb).backward()
    assert rel_err(grads(plain), grads(ref)) > 1e-3


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("hook", ["tensor", "module"])
@pytest.mark.parametrize("strategy", ["store", "stream"])
def test_store_and_stream_refuse_hooks_on_activations(strategy: str, hook: str, chunk: int) -> None:
    """With chunks too: store's pose run alone says it is the hook, not a batch of one."""
    net = Plain(hook)
    model = combframe.MultiPoseModel(net, "max", strategy=strategy, chunk_size=chunk)
    with pytest.raises(combframe.StrategyError, match=rf"hook .*{strategy}.*recompute"):
        model(row_poses(4))
    assert all(p.grad is None for p in net.parameters())


# ---- energy + force models that make their own leaves ---------------------------
class ForceField(torch.nn.Module):
    """Energy and the squared forces of a pose ``(atoms, 3)`` (or a chunk ``(b, atoms, 3)``).

    ``leaf``: "private" makes a leaf of its own; "inplace" calls ``pos.requires_grad_()``.
    """

    def __init__(self, leaf: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.leaf = leaf
        self.lin = torch.nn.Linear(3, 6).double()
        self.out = torch.nn.Linear(6, 1).double()

    def forward(self, pos: Tensor) -> Tensor:
        with torch.enable_grad():
            p = pos.detach().requires_grad_() if self.leaf == "private" else pos.requires_grad_()
            energy = self.out(torch.tanh(self.lin(p))).sum(dim=(-2, -1))
            (grad,) = torch.autograd.grad(energy.sum(), p, create_graph=True)
        return energy + 0.1 * grad.pow(2).sum(dim=(-2, -1))


def positions(n: int, atoms: int = 4, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((atoms, 3), generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_model_with_a_private_leaf_for_forces_matches_the_full_graph(
    strategy: str, chunk: int
) -> None:
    poses = positions(5)
    comb = MeanCombination()
    ref = ForceField("private")
    full_graph(ref, poses, comb).backward()
    net = ForceField("private")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.errors.StrategyWarning)
        model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=chunk)
        model(poses)[0].backward()
    assert rel_err(grads(net), grads(ref)) <= RTOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_model_that_makes_the_pose_require_grad_is_refused_with_the_fix(strategy: str) -> None:
    poses = positions(4)
    net = ForceField("inplace")
    model = combframe.MultiPoseModel(net, "mean", strategy=strategy)
    with pytest.raises(combframe.CombinationError, match=r"requires_grad on the poses"):
        model(poses)
    assert not any(p.requires_grad for p in poses)
    # the fix the message gives: gradients reach the parameters and the positions
    ref_poses = [p.clone().requires_grad_() for p in poses]
    ref = ForceField("inplace")
    full_graph(ref, ref_poses, MeanCombination()).backward()
    for p in poses:
        p.requires_grad_()
    model(poses)[0].backward()
    assert rel_err(grads(net), grads(ref)) <= RTOL
    assert rel_err([p.grad for p in poses], [p.grad for p in ref_poses]) <= RTOL


# ---- a parameter frozen between forward and backward ---------------------------
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_parameter_frozen_between_forward_and_backward_gets_no_gradient(
    strategy: str, chunk: int
) -> None:
    poses = row_poses(5)
    ref = Plain()
    combined = full_graph(ref, poses, MeanCombination())
    ref.lin.weight.requires_grad_(False)
    combined.backward()
    net = Plain()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.errors.StrategyWarning)
        model = combframe.MultiPoseModel(net, "mean", strategy=strategy, chunk_size=chunk)
        combined, _ = model(poses)
    net.lin.weight.requires_grad_(False)
    combined.backward()
    assert net.lin.weight.grad is None and ref.lin.weight.grad is None
    assert rel_err(grads(net), grads(ref)) <= RTOL


@pytest.mark.parametrize("chunk", [1, 2])
def test_recompute_names_a_mode_switch_between_forward_and_backward(chunk: int) -> None:
    net = torch.nn.Sequential(Plain(), torch.nn.Dropout(0.5)).train()
    model = combframe.MultiPoseModel(net, "mean", strategy="recompute", chunk_size=chunk)
    combined, _ = model(row_poses(5))
    net.eval()  # the re-runs would see no dropout
    with pytest.raises(combframe.StrategyError, match=r"changed between the forward and the"):
        combined.backward()
    assert all(p.grad is None for p in net.parameters())


# ---- a pose the combination gives no weight still gets a tensor gradient ---------
class Energy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1).double()

    def forward(self, pos: Tensor) -> Tensor:
        return self.lin(pos).sum(dim=(-2, -1))


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_positions_of_poses_with_zero_weight_get_zeros(strategy: str, chunk: int) -> None:
    comb = MaxCombination(negate_preds=True, pred_scale=1000.0)
    base = positions(6, seed=2)
    for k, p in enumerate(base):
        p -= 3.0 * k  # the best pose first; the others get exactly zero weight
    ref_pos = [p.clone().requires_grad_() for p in base]
    ref = Energy()
    per_pose = torch.stack([ref(p) for p in ref_pos])
    assert int((torch.softmax(-1000.0 * per_pose.detach(), 0) == 0).sum()) >= 2
    comb.value(per_pose).backward()
    pos = [p.clone().requires_grad_() for p in base]
    net = Energy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.errors.StrategyWarning)
        model = combframe.MultiPoseModel(net, comb, strategy=strategy, chunk_size=chunk)
        model(pos)[0].backward()
    forces = [-p.grad for p in pos]  # as the docs write it: every pose has a tensor
    assert rel_err(forces, [-p.grad for p in ref_pos]) <= RTOL
    assert rel_err(grads(net), grads(ref)) <= RTOL


# ---- store refuses a model that mixes the poses of a batch in either mode -------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_store_refuses_a_model_that_mixes_the_poses_of_a_batch_in_either_mode(mode: str) -> None:
    net = getattr(MixesPoses(), mode)()
    model = combframe.MultiPoseModel(net, "mean", strategy="store", chunk_size=3)
    with pytest.raises(combframe.CombinationError, match=r"mixes the poses of a batch"):
        model(row_poses(6))
    assert all(p.grad is None for p in net.parameters())


# ---- store and a pose tensor that every pose shares -----------------------------
class Pocket(torch.nn.Module):
    """A ligand pose ``(atoms, 3)`` scored against a shared protein tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1).double()

    def forward(self, pose: dict[str, Tensor]) -> Tensor:
        contact = pose["protein"].mean(0)
        return self.lin(pose["ligand"] + contact).sum()


def test_store_holds_one_gradient_per_pose_of_a_shared_pose_tensor_and_says_so() -> None:
    def run(n: int) -> tuple[int, list[warnings.WarningMessage]]:
        protein = torch.randn(1 << 15, 3, dtype=torch.float64, requires_grad=True)  # 0.75 MiB
        poses = [{"ligand": p, "protein": protein} for p in positions(n)]
        model = combframe.MultiPoseModel(Pocket(), "mean")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peak = peak_tensor_bytes(lambda: model(poses)[0].backward())
        return peak, caught

    mib = 1 << 20
    small, _ = run(4)
    large, caught = run(20)
    # one 0.75 MiB copy per pose (16 more), not two
    assert large - small < 16 * 0.75 * mib + mib, (small / mib, large / mib)
    assert any("15.0 MiB until backward" in str(w.message) for w in caught)


def test_a_shared_pose_tensor_gets_the_full_graph_gradient_under_store() -> None:
    base = torch.randn(6, 3, dtype=torch.float64)
    ref_protein = base.clone().requires_grad_()
    ligands = positions(4)
    ref = Pocket()
    per_pose = torch.stack([ref({"ligand": p, "protein": ref_protein}) for p in ligands])
    MaxCombination(negate_preds=True, pred_scale=3.0).value(per_pose).backward()
    protein = base.clone().requires_grad_()
    net = Pocket()
    model = combframe.MultiPoseModel(net, MaxCombination(negate_preds=True, pred_scale=3.0))
    model([{"ligand": p, "protein": protein} for p in ligands])[0].backward()
    assert protein.grad is not None and ref_protein.grad is not None
    assert rel_err([protein.grad], [ref_protein.grad]) <= RTOL
    assert rel_err(grads(net), grads(ref)) <= RTOL


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def test_a_backward_hook_on_the_readout_module_is_seen() -> None:
    readout = Scale()
    readout.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(-0.02, 0.02),))
    model = combframe.MultiPoseModel(Plain(), "max", strategy="store", pred_readout=readout)
    with pytest.raises(combframe.StrategyError, match=r"hook .*store.*recompute"):
        model(row_poses(3))


class CountsCalls(torch.nn.Module):
    """Writes a buffer on every call, in eval mode too, and reads it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 1).double()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.calls.add_(1.0)
        return self.lin(x).sum(dim=(-2, -1)) * (1.0 + 0.1 * self.calls)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recompute_reruns_a_model_that_writes_buffers_from_their_own_values(mode: str) -> None:
    """A buffer written on every call, in eval mode too: the re-runs never write it."""
    ref = getattr(CountsCalls(), mode)()
    full_graph(ref, row_poses(4), MeanCombination()).backward()
    net = getattr(CountsCalls(), mode)()
    model = combframe.MultiPoseModel(net, "mean", strategy="recompute")
    model(row_poses(4))[0].backward()
    assert float(net.calls) == 4.0  # as the full graph's four calls
    assert rel_err(grads(net), grads(ref)) <= RTOL
