"""CUDA: parity, devices, autocast, RNG replay and DDP with NCCL (skipped without a GPU)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import combframe
from combframe.testing import full_graph_gradients, make_loss, multipose_gradients
from tests.conftest import make_mlp, make_poses
from tests.test_ddp import WORLD, _free_port, _worker
from tests.test_training import AtomNet, assert_close, atoms, grads, kind_for, reference

pytestmark = pytest.mark.cuda

STRATEGIES = ["store", "recompute", "stream"]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["max", "mean", "boltzmann"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float64_parity_on_cuda(strategy: str, name: str) -> None:
    comb = combframe.create_combination(name)
    loss = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    poses = make_poses(7, seed=1)
    _, want_p, want_g = full_graph_gradients(make_mlp(seed=2), comb, poses, loss)
    net = make_mlp(seed=2).to(CUDA)
    _, got_p, got_g = multipose_gradients(net, comb, [p.to(CUDA) for p in poses], loss, strategy)
    assert all(g.device.type == "cuda" for g in got_g)
    assert_close([got_p.cpu()], [want_p], "per-pose predictions", 1e-12)
    assert_close([g.cpu() for g in got_g], want_g, f"{name}/{strategy} grads", 1e-10)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["max", "boltzmann"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [3, 8])
def test_float64_parity_of_chunks_and_compounds_on_cuda(
    strategy: str, name: str, chunk: int
) -> None:
    """Chunks spanning compounds, forces on the pose tensors, on the GPU."""
    comb = combframe.create_combination(name, **({"pred_scale": 4.0} if name == "max" else {}))
    loss = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    sizes = [3, 1, 4]
    cpu_poses = [p.requires_grad_() for p in make_poses(8, seed=4)]
    want_c, want_p, want_g = full_graph_gradients(
        make_mlp(seed=3), comb, cpu_poses, loss, sizes=sizes
    )
    want_x = [p.grad.clone() for p in cpu_poses]  # type: ignore[union-attr]
    leaves = [p.detach().to(CUDA).requires_grad_() for p in cpu_poses]
    net = make_mlp(seed=3).to(CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", combframe.StrategyWarning)  # store: pose by pose
        got_c, got_p, got_g = multipose_gradients(
            net, comb, leaves, loss, strategy, sizes=sizes, chunk_size=chunk
        )
    assert_close([got_c.cpu()], [want_c], "combined", 1e-12)
    assert_close([got_p.cpu()], [want_p], "per-pose predictions", 1e-12)
    assert_close([g.cpu() for g in got_g], want_g, f"{name}/{strategy} grads", 1e-10)  # type: ignore[arg-type]
    assert_close([p.grad.cpu() for p in leaves], want_x, "pose gradients", 1e-10)  # type: ignore[union-attr]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_poses_on_cpu_with_a_cuda_model(strategy: str) -> None:
    comb = combframe.create_combination("max", pred_scale=3.0)
    poses = make_poses(4, seed=3)
    net = make_mlp(seed=5).to(CUDA)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(combframe.CombinationError) as err:
        combframe.MultiPoseModel(net, comb, strategy=strategy)(poses)
    assert "pose 0 holds a tensor on cpu" in str(err.value) and "cuda:0" in str(err.value)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())  # type: ignore[arg-type]

    net.zero_grad(set_to_none=True)
    moved = combframe.MultiPoseModel(net, comb, strategy=strategy, move_poses=True)
    combined, per_pose = moved(poses)
    assert combined.device.type == "cuda"
    make_loss("combined")(combined, per_pose).backward()
    ref = make_mlp(seed=5)
    _, _, want = full_graph_gradients(ref, comb, poses, make_loss("combined"))
    assert_close([p.grad.cpu() for p in net.parameters()], want, "move_poses", 1e-10)  # type: ignore[union-attr, misc]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autocast_on_cuda(strategy: str, dtype: torch.dtype) -> None:
    comb = combframe.create_combination("boltzmann", kT=1.5)
    loss_fn = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    poses = [p.float().to(CUDA) for p in make_poses(6, seed=8)]
    ref_net = make_mlp(seed=6).float().to(CUDA)
    net = copy.deepcopy(ref_net)
    with torch.autocast("cuda", dtype=dtype):
        want = reference(ref_net, comb, poses)
        got = combframe.MultiPoseModel(net, comb, strategy=strategy)(poses)
    assert got[0].dtype == got[1].dtype == torch.float32
    loss_fn(*want).backward()
    loss_fn(*got).backward()
    assert_close(grads(net), grads(ref_net), f"autocast {dtype} {strategy}", 2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropout_and_batch_norm_on_cuda(strategy: str) -> None:
    """recompute replays the CUDA generator; buffers match the reference."""
    comb = combframe.create_combination("max", pred_scale=2.0)
    loss_fn = make_loss(kind_for(strategy))  # type: ignore[arg-type]
    poses = [p.to(CUDA) for p in atoms(5)]
    ref_net = AtomNet().to(CUDA)
    net = copy.deepcopy(ref_net)
    torch.manual_seed(7)
    loss_fn(*reference(ref_net, comb, poses)).backward()
    ref_rng = torch.cuda.get_rng_state()
    torch.manual_seed(7)
    loss_fn(*combframe.MultiPoseModel(net, comb, strategy=strategy)(poses)).backward()
    assert_close(grads(net), grads(ref_net), f"cuda dropout {strategy}", 1e-10)
    assert_close(list(net.buffers()), list(ref_net.buffers()), "buffers", 1e-12)  # type: ignore[arg-type]
    assert torch.equal(torch.cuda.get_rng_state(), ref_rng)


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs")
def test_ddp_nccl_two_gpus() -> None:
    args: Any = (_free_port(), "nccl")
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
