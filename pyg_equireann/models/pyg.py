"""Glue for running PyG's own models (SchNet, DimeNet++, ViSNet) without compiled extensions
(PyG 2.8's ``radius_graph`` needs pyg-lib or torch-cluster; DimeNet's triplets need torch-sparse)."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.nn.models import DimeNetPlusPlus, ViSNet
from torch_geometric.utils import scatter

from pyg_equireann.graph.edges import edge_vectors
from pyg_equireann.graph.edges import ensure_graph


class RadiusInteractionGraph(nn.Module):
    """Drop-in ``interaction_graph`` for :class:`torch_geometric.nn.models.SchNet` (and models with the
    same hook) built on :func:`pyg_equireann.radius_graph`, which needs neither pyg-lib nor
    torch-cluster. Unlike PyG's default it never truncates neighbours (``max_num_neighbors``), so the
    energy stays a smooth function of the positions.

    Example::

        from torch_geometric.nn.models import SchNet
        model = SchNet(cutoff=5.0, interaction_graph=RadiusInteractionGraph(5.0))
    """

    def __init__(self, cutoff: float, backend: str = "auto"):
        super().__init__()
        self.cutoff = float(cutoff)
        self.backend = backend

    def forward(self, pos: Tensor, batch: Tensor) -> Tuple[Tensor, Tensor]:
        """pos (N, 3), batch (N,) → edge_index (2, E), edge_weight (E,) distances in Å."""
        edge_index, _ = ensure_graph(pos, self.cutoff, batch, backend=self.backend)
        return edge_index, torch.linalg.vector_norm(edge_vectors(pos, edge_index), dim=-1)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, backend={self.backend!r}"


def triplets(edge_index: Tensor, num_nodes: int):
    """Native-torch replacement of ``torch_geometric.nn.models.dimenet.triplets`` (which needs
    torch-sparse): for every edge j→i, every edge k→j with k ≠ i.

    Returns ``(i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji)`` with the same meaning as PyG's.
    """
    row, col = edge_index  # j → i
    num_edges = row.numel()
    order = torch.argsort(col, stable=True)  # edges grouped by their target
    in_degree = torch.bincount(col, minlength=num_nodes)
    ptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=row.device)
    ptr[1:] = torch.cumsum(in_degree, 0)
    counts = in_degree[row]  # edges k→j arriving at the source j of each edge j→i
    idx_ji = torch.repeat_interleave(torch.arange(num_edges, device=row.device), counts)
    offsets = torch.arange(idx_ji.numel(), device=row.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    idx_kj = order[ptr[row[idx_ji]] + offsets]
    idx_i, idx_j, idx_k = col[idx_ji], row[idx_ji], row[idx_kj]
    keep = idx_i != idx_k
    return col, row, idx_i[keep], idx_j[keep], idx_k[keep], idx_kj[keep], idx_ji[keep]


class DimeNetPlusPlusPotential(DimeNetPlusPlus):
    """PyG's :class:`~torch_geometric.nn.models.DimeNetPlusPlus` with a compiled-free neighbour list
    and triplet construction (PyG's own need pyg-lib or torch-cluster, and torch-sparse). Same
    constructor; ``forward(z, pos, batch)`` returns (B,) energies. Neighbours are never truncated."""

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        edge_index, _ = ensure_graph(pos, self.cutoff, batch)
        i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = triplets(edge_index, num_nodes=z.size(0))
        dist = (pos[i] - pos[j]).pow(2).sum(dim=-1).sqrt()
        pos_jk, pos_ij = pos[idx_j] - pos[idx_k], pos[idx_i] - pos[idx_j]
        a = (pos_ij * pos_jk).sum(dim=-1)
        b = torch.cross(pos_ij, pos_jk, dim=1).norm(dim=-1)
        angle = torch.atan2(b, a)
        rbf = self.rbf(dist)
        sbf = self.sbf(dist, angle, idx_kj)
        x = self.emb(z, rbf, i, j)
        P = self.output_blocks[0](x, rbf, i, num_nodes=pos.size(0))
        for interaction_block, output_block in zip(self.interaction_blocks, self.output_blocks[1:]):
            x = interaction_block(x, rbf, sbf, idx_kj, idx_ji)
            P = P + output_block(x, rbf, i, num_nodes=pos.size(0))
        if batch is None:
            return P.sum(dim=0)
        return scatter(P, batch, dim=0, reduce="sum").view(-1)


class _ViSNetDistance(nn.Module):
    """ViSNet's ``Distance`` (edges with self-loops, distances, vectors) on the compiled-free list."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, pos: Tensor, batch: Tensor):
        edge_index, _ = ensure_graph(pos, self.cutoff, batch)
        loops = torch.arange(pos.size(0), device=pos.device)
        edge_index = torch.cat([edge_index, torch.stack([loops, loops])], dim=1)
        edge_vec = edge_vectors(pos, edge_index)
        mask = edge_index[0] != edge_index[1]
        edge_weight = torch.zeros(edge_vec.size(0), device=pos.device, dtype=pos.dtype)
        edge_weight[mask] = torch.norm(edge_vec[mask], dim=-1)
        return edge_index, edge_weight, edge_vec


class ViSNetPotential(nn.Module):
    """PyG's :class:`~torch_geometric.nn.models.ViSNet` with the SchNet-style signature
    ``forward(z, pos, batch) -> (B,)`` energies, a compiled-free neighbour list, and forces left to
    the caller's autograd (so it trains like every other model). Keyword arguments go to ViSNet."""

    def __init__(self, **kwargs):
        super().__init__()
        kwargs["derivative"] = False
        self.visnet = ViSNet(**kwargs)
        self.cutoff = float(kwargs.get("cutoff", 5.0))
        self.visnet.representation_model.distance = _ViSNetDistance(self.cutoff)

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        if batch is None:
            batch = torch.zeros_like(z)
        energy, _ = self.visnet(z, pos, batch)
        return energy.view(-1)
