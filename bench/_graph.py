"""A graph-style single-pose model in plain torch, with poses of varying atom counts.

Each pose is a dict of atom features ``x`` (atoms x 16), positions ``pos`` (atoms x 3)
and the directed edges to each atom's 8 nearest neighbours (``edge_index``, 2 x E).
``graph_collate`` concatenates poses along atoms (shifting the edge indices) and adds the
``batch`` vector, as PyTorch Geometric's ``Batch`` does; the model passes messages along
the edges and sums each graph's atoms to one prediction, so it returns one value per
pose of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

FEATURES = 16
NEIGHBOURS = 8


class MessageLayer(nn.Module):
    """h_i <- h_i + sum_j MLP([h_j, |r_ij|]) over the edges j -> i."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.message = nn.Sequential(
            nn.Linear(width + 1, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.update = nn.Linear(width, width)

    def forward(self, h: Tensor, pos: Tensor, edge_index: Tensor) -> Tensor:
        src, dst = edge_index
        dist = (pos[src] - pos[dst]).norm(dim=-1, keepdim=True)
        msg = self.message(torch.cat([h[src], dist], dim=-1))
        agg = torch.zeros_like(h).index_add(0, dst, msg)
        return h + torch.nn.functional.silu(self.update(agg))


class GraphModel(nn.Module):
    """Embedding, three message-passing layers, per-atom energy, per-graph sum."""

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.layers = nn.ModuleList(MessageLayer(width) for _ in range(layers))
        self.energy = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, graph: dict[str, Tensor]) -> Tensor:
        h = self.embed(graph["x"])
        for layer in self.layers:
            h = layer(h, graph["pos"], graph["edge_index"])
        atom_energy = self.energy(h).squeeze(-1)
        batch = graph.get("batch")
        if batch is None:  # one pose: one graph
            return atom_energy.sum().reshape(1)
        graphs = int(graph["num_graphs"])
        return torch.zeros(graphs, dtype=h.dtype, device=h.device).index_add(0, batch, atom_energy)


def graph_collate(poses: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """Concatenate poses along atoms, shift edge indices, add the batch vector."""
    sizes = [p["x"].shape[0] for p in poses]
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    device = poses[0]["x"].device
    return {
        "x": torch.cat([p["x"] for p in poses]),
        "pos": torch.cat([p["pos"] for p in poses]),
        "edge_index": torch.cat(
            [p["edge_index"] + int(o) for p, o in zip(poses, offsets, strict=True)], dim=1
        ),
        "batch": torch.repeat_interleave(
            torch.arange(len(poses), device=device), torch.tensor(sizes, device=device)
        ),
        "num_graphs": len(poses),
    }


def make_graph_poses(
    n: int,
    atoms: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    spread: int = 4,
) -> list[dict[str, Tensor]]:
    """``n`` poses of ``atoms - spread .. atoms + spread`` atoms (so sizes differ)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        count = atoms + int(torch.randint(-spread, spread + 1, (1,), generator=gen))
        pos = 3.0 * torch.rand(count, 3, generator=gen, dtype=dtype)
        dist = torch.cdist(pos, pos) + torch.eye(count, dtype=dtype) * 1e9
        k = min(NEIGHBOURS, count - 1)
        nbr = dist.topk(k, largest=False).indices  # (count, k)
        dst = torch.arange(count).repeat_interleave(k)
        edge_index = torch.stack([nbr.reshape(-1), dst])
        x = torch.randn(count, FEATURES, generator=gen, dtype=dtype)
        out.append({"x": x.to(device), "pos": pos.to(device), "edge_index": edge_index.to(device)})
    return out
