"""Training semantics: MultiPoseModel inside real training loops, against the full graph.

The reference keeps all N pose graphs and combines with the combination's own
``value``; everything combframe does in a training step (gradients, optimizer steps,
batch-norm statistics, the global RNG) must match it.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import combframe
from combframe.testing import LOSSES, gradient_parity, make_loss
from tests.conftest import make_mlp, make_poses

STRATEGIES = ["store", "recompute", "stream"]
RTOL = 1e-10


def kind_for(strategy: str) -> str:
    """The richest loss a strategy supports: stream is exact for combined losses only."""
    return "combined" if strategy == "stream" else "both"


def reference(model: torch.nn.Module, comb: Any, poses: list[Any]) -> tuple[Tensor, Tensor]:
    """The full graph: every pose's graph alive, combined with ``comb.value``.

    Predictions are combined in the parameters' dtype (autocast outputs are promoted).
    """
    per_pose = torch.stack([model(p).reshape(()) for p in poses])
    dtype = next(model.parameters()).dtype
    per_pose = per_pose.to(torch.promote_types(per_pose.dtype, dtype))
    return comb.value(per_pose), per_pose


def assert_close(
    got: list[Tensor | None], want: list[Tensor | None], what: str, rtol: float
) -> None:
    """Per tensor, relative to the largest reference entry over all tensors.

    (A bias before batch norm has an exactly-zero gradient, up to rounding.)
    """
    scale = max((w.abs().max().item() for w in want if w is not None and w.numel()), default=0)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), f"{what}: .grad {i} is {g} but the reference has {w}"
        if g is None or w is None:
            continue
        assert g.dtype == w.dtype, f"{what}: tensor {i} has dtype {g.dtype}, want {w.dtype}"
        err = (g - w).abs().max().item() / max(scale, 1e-30)
        assert err <= rtol, f"{what}: tensor {i} differs by {err:.3e} relative (> {rtol})"


def grads(model: torch.nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


class AtomNet(torch.nn.Module):
    """Per-atom features -> linear -> batch norm over atoms -> dropout -> one prediction."""

    def __init__(self, features: int = 5, hidden: int = 8, dropout: float = 0.3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.lin = torch.nn.Linear(features, hidden)
        self.norm = torch.nn.BatchNorm1d(hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(hidden, 1)
        self.double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.drop(self.norm(self.lin(x))))).sum()


def atoms(n: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((4, 5), generator=gen, dtype=torch.float64) for _ in range(n)]


# ---- accumulation, micro-batches, zero_grad --------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accumulation_over_compounds_and_micro_batches(strategy: str, set_to_none: bool) -> None:
    """Two optimizer steps, each over two micro-batches of two compounds (backward each)."""
    comb = combframe.create_combination("max", pred_scale=3.0)
    loss_fn = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    batches = [[make_poses(2 + c, seed=10 * b + c) for c in range(2)] for b in range(4)]
    ref_net, net = make_mlp(seed=1), make_mlp(seed=1)
    multi = combframe.MultiPoseModel(net, comb, strategy=strategy)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        for micro in batches[2 * step : 2 * step + 2]:
            ref_loss = sum(loss_fn(*reference(ref_net, comb, poses)) for poses in micro)
            (ref_loss / len(micro)).backward()  # type: ignore[union-attr]
            loss = sum(loss_fn(*multi(poses)) for poses in micro)
            (loss / len(micro)).backward()  # type: ignore[union-attr]
        what = f"{strategy}, step {step}"
        assert_close(grads(net), grads(ref_net), f"{what}, accumulated grads", RTOL)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad(set_to_none=set_to_none)
        opt.zero_grad(set_to_none=set_to_none)
        assert_close(grads(net), grads(ref_net), f"{what}, after zero_grad", 0.0)
    assert_close(list(net.parameters()), list(ref_net.parameters()), "parameters", RTOL)


# ---- frozen, unused and tied parameters --------------------------------------------------


class Tied(torch.nn.Module):
    """A module used twice, a weight tied across two layers, a frozen and an unused one."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(features, features)
        self.again = self.shared  # the same module under a second name
        self.enc = torch.nn.Linear(features, 6)
        self.dec = torch.nn.Linear(6, features)
        self.dec.weight = torch.nn.Parameter(self.enc.weight.t().contiguous())
        self.frozen = torch.nn.Linear(features, features)
        self.frozen.requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.ones(3))
        self.head = torch.nn.Linear(features, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.again(torch.tanh(self.shared(x))))
        h = torch.tanh(self.frozen(h)) + torch.tanh(h @ self.enc.weight.t() @ self.enc.weight)
        return self.head(h).sum(dim=(-2, -1))  # one value per pose, (B,) for a chunk


def tied_factory(seed: int, features: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = Tied(features).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name", ["max", "mean", "boltzmann"])
def test_frozen_unused_and_tied_parameters_match_the_reference(name: str) -> None:
    result = gradient_parity(
        combframe.create_combination(name),
        losses=LOSSES,
        n_poses=(1, 5),
        seeds=(0,),
        model_factory=tied_factory,
    )
    assert result.passed, f"worst case {result.worst_case()}; errors {result.errors}"
    # per N: one pose per pass (store, recompute, auto, mtenn: 3 losses; stream: combined
    # only), then chunks of 3, three compounds, and both (store, recompute, auto: 3; stream: 1)
    assert len(result.cases) == 2 * ((4 * 3 + 1) + 3 * (3 * 3 + 1)), result.cases


def test_tied_frozen_unused_gradient_fields() -> None:
    net = tied_factory(0, 5)
    combined, _ = combframe.MultiPoseModel(net, "max")(make_poses(3))
    combined.backward()
    assert net.frozen.weight.grad is None, "a frozen parameter received a gradient"
    # As autograd: an unused parameter keeps .grad None (AdamW's weight decay leaves it).
    assert net.unused.grad is None
    assert net.shared.weight.grad is not None and net.shared.weight is net.again.weight


# ---- eval vs train, dropout, batch norm, RNG ------------------------------------------------


@pytest.mark.parametrize(
    "strategy", ["store", "recompute", "stream", combframe.Recompute(check=True)], ids=str
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dropout_and_batch_norm_match_the_reference(strategy: Any, train: bool) -> None:
    name = strategy if isinstance(strategy, str) else strategy.name
    comb = combframe.create_combination("boltzmann", kT=0.7)
    loss_fn = make_loss(kind_for(name))  # type: ignore[arg-type]
    poses = atoms(5)
    ref_net = AtomNet().train(train)
    net = copy.deepcopy(ref_net)
    multi = combframe.MultiPoseModel(net, comb, strategy=strategy)

    torch.manual_seed(1234)
    want = reference(ref_net, comb, poses)
    loss_fn(*want).backward()
    ref_rng = torch.get_rng_state()

    torch.manual_seed(1234)
    got = multi(poses)
    loss_fn(*got).backward()

    what = f"{strategy}/{'train' if train else 'eval'}"
    assert_close([got[0], got[1]], [want[0].detach(), want[1].detach()], f"{what} preds", RTOL)
    assert_close(grads(net), grads(ref_net), f"{what} grads", RTOL)
    buffers = list(net.buffers())
    assert_close(buffers, list(ref_net.buffers()), f"{what} batch-norm statistics", 0.0)  # type: ignore[arg-type]
    assert int(net.norm.num_batches_tracked) == (5 if train else 0)
    assert torch.equal(torch.get_rng_state(), ref_rng), f"{what}: global RNG state differs"


def test_dropout_really_draws_in_train_mode() -> None:
    """Guard for the test above: two train-mode forwards with different seeds differ."""
    multi = combframe.MultiPoseModel(AtomNet(), "mean")
    torch.manual_seed(0)
    a = multi(atoms(3))[1]
    torch.manual_seed(1)
    b = multi(atoms(3))[1]
    assert not torch.equal(a, b)


# ---- inference ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference"]
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inference_modes(strategy: str, mode: Callable[[], Any]) -> None:
    net = AtomNet().eval()
    comb = combframe.create_combination("max", pred_scale=2.0)
    multi = combframe.MultiPoseModel(net, comb, strategy=strategy)
    poses = atoms(4)
    with torch.no_grad():
        want_c, want_p = reference(net, comb, poses)
    with mode():
        combined, per_pose = multi(poses)
    assert not combined.requires_grad and not per_pose.requires_grad
    assert torch.equal(combined, want_c) and torch.equal(per_pose, want_p)
    assert all(p.grad is None for p in net.parameters())


# ---- torch.compile ------------------------------------------------------------------------


def _compiled_parity(backend: str, strategies: list[str], rtol: float) -> None:
    comb = combframe.create_combination("max", pred_scale=3.0)
    poses = make_poses(4)
    ref_net = make_mlp(seed=2)
    loss_fn = make_loss("both")
    loss_fn(*reference(ref_net, comb, poses)).backward()
    torch._dynamo.reset()
    for strategy in strategies:
        net = make_mlp(seed=2)
        compiled = torch.compile(net, backend=backend)
        multi = combframe.MultiPoseModel(compiled, comb, strategy=strategy)
        for _ in range(2):  # the second call reuses the compiled graphs
            net.zero_grad(set_to_none=True)
            loss_fn(*multi(poses)).backward()
        assert_close(grads(net), grads(ref_net), f"compiled ({backend}) {strategy}", rtol)


def test_torch_compile_aot_eager() -> None:
    """Dynamo capture and AOT autograd of the single-pose model (no code generation)."""
    _compiled_parity("aot_eager", ["store", "recompute"], RTOL)


def test_torch_compile_stream_in_chunks() -> None:
    """Stream back-propagates a chunk once per running sum: a compiled backward that frees
    its saved tensors (donated buffers, the default) is refused by name, before any
    ``.grad`` is written; without donated buffers the gradients are exact."""
    comb = combframe.create_combination("boltzmann", kT=0.8)
    poses = make_poses(5)  # one compound in chunks of 3: it spans them, two sums
    loss_fn = make_loss("combined")
    ref_net = make_mlp(seed=2)
    loss_fn(*reference(ref_net, comb, poses)).backward()
    for donated in (True, False):
        torch._dynamo.reset()
        net = make_mlp(seed=2)
        multi = combframe.MultiPoseModel(
            torch.compile(net, backend="aot_eager"), comb, strategy="stream", chunk_size=3
        )
        with torch._functorch.config.patch(donated_buffer=donated):
            if donated:
                with pytest.raises(combframe.StrategyError, match=r"donated_buffer.*recompute"):
                    loss_fn(*multi(poses)).backward()
                assert all(p.grad is None for p in net.parameters())
                continue
            loss_fn(*multi(poses)).backward()
        assert_close(grads(net), grads(ref_net), "compiled stream in chunks", RTOL)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
    reason="inductor needs a C++ compiler on the CPU",
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_inductor() -> None:
    """Inductor code generation; compiling takes ~30 s on two CPU cores."""
    _compiled_parity("inductor", ["store"], 1e-9)


# ---- dtypes and autocast ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_matches_float64_reference(strategy: str) -> None:
    comb = combframe.create_combination("boltzmann", kT=0.8)
    loss_fn = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    poses = make_poses(6, seed=5)
    ref_net = make_mlp(seed=3)
    loss_fn(*reference(ref_net, comb, poses)).backward()
    net = make_mlp(seed=3).float()
    combined, per_pose = combframe.MultiPoseModel(net, comb, strategy=strategy)(
        [p.float() for p in poses]
    )
    assert combined.dtype == per_pose.dtype == torch.float32
    loss_fn(combined, per_pose).backward()
    want = [g.float() for g in grads(ref_net) if g is not None]
    assert_close(grads(net), want, f"float32 {strategy}", 1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autocast_bfloat16_on_cpu(strategy: str) -> None:
    """The model runs in bfloat16; predictions are combined and gradients kept in float32."""
    comb = combframe.create_combination("max", pred_scale=2.0)
    loss_fn = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    poses = [p.float() for p in make_poses(5, seed=6)]
    ref_net = make_mlp(seed=4).float()
    net = copy.deepcopy(ref_net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ref_net(poses[0]).dtype == torch.bfloat16
        want = reference(ref_net, comb, poses)  # promotes the bf16 outputs to float32
        got = combframe.MultiPoseModel(net, comb, strategy=strategy)(poses)
    assert got[0].dtype == got[1].dtype == torch.float32
    loss_fn(*want).backward()
    loss_fn(*got).backward()
    assert_close([got[1]], [want[1].detach()], f"autocast {strategy} preds", 0.0)
    # The model's internals are bfloat16 in both; they differ only where the reference
    # rounds c_i to bfloat16 on its way into the model's output.
    assert_close(grads(net), grads(ref_net), f"autocast {strategy} grads", 2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
