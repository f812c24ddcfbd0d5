"""Edge geometry: the one place where edge vectors and periodic image shifts are computed.

Convention (as in :mod:`pyg_equireann.graph.neighbors`): ``edge_index[0] = j`` (neighbour),
``edge_index[1] = i`` (centre), and :math:`r_{ij} = x_j - x_i + S_{ij}` with the Cartesian image
shift :math:`S_{ij} = n_{ij} \\cdot \\mathrm{cell}` of the integer cell offsets :math:`n_{ij}`.

Both functions compile with ``torch.jit.script`` (the exported model uses them).
"""
from typing import Optional

import torch
from torch import Tensor


def image_shifts(edge_index: Tensor, cell_offsets: Tensor, cell: Tensor, batch: Optional[Tensor] = None) -> Tensor:
    """Cartesian image shifts :math:`S_{ij}` (E, 3) Å, in the dtype of ``cell_offsets``.

    Args:
        edge_index: (2, E) [neighbour j, centre i].
        cell_offsets: (E, 3) integer-valued offsets :math:`n_{ij}` (float dtype).
        cell: (3, 3) one cell for every edge, or (B, 3, 3) one per graph (rows = lattice vectors, Å);
            edge e then uses the cell of its centre's graph ``batch[i]``.
        batch: (N,) graph index of each atom; needed with (B, 3, 3) cells when B > 1 (None: graph 0).

    A (3, 3) cell is one matrix product, a (B, 3, 3) cell a batched one; the two round differently
    in the last bit, so each caller keeps the form it was written with.
    """
    cell = cell.to(cell_offsets.dtype)
    if cell.dim() == 2:
        return cell_offsets @ cell
    cells = cell.view(-1, 3, 3)
    if batch is None:
        graph = torch.zeros_like(edge_index[1])
    else:
        graph = batch.index_select(0, edge_index[1])
    return torch.einsum("ei,eij->ej", [cell_offsets, cells.index_select(0, graph)])


def edge_vectors(pos: Tensor, edge_index: Tensor, edge_shift: Optional[Tensor] = None) -> Tensor:
    """Edge vectors :math:`r_{ij} = x_j - x_i + S_{ij}` (E, 3) Å from ``pos`` (N, 3), ``edge_index``
    (2, E) [j, i] and the Cartesian shifts ``edge_shift`` (E, 3) of periodic edges (None: no shifts).
    Their lengths are ``torch.linalg.vector_norm(r, dim=-1)``."""
    vectors = pos.index_select(0, edge_index[0]) - pos.index_select(0, edge_index[1])
    if edge_shift is not None:
        vectors = vectors + edge_shift
    return vectors
