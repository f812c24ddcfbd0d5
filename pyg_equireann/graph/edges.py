"""The edges of a structure: the neighbour list as given or built (:func:`ensure_graph`), and the one place
where edge vectors and periodic image shifts are computed.

Convention (as in :mod:`pyg_equireann.graph.neighbors`): ``edge_index[0] = j`` (neighbour),
``edge_index[1] = i`` (centre), and :math:`r_{ij} = x_j - x_i + S_{ij}` with the Cartesian image
shift :math:`S_{ij} = n_{ij} \\cdot \\mathrm{cell}` of the integer cell offsets :math:`n_{ij}`.

``image_shifts`` and ``edge_vectors`` compile with ``torch.jit.script`` (the exported model uses them).
"""
from typing import Optional

import torch
from torch import Tensor

from pyg_equireann.graph.checks import check_structure


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


def ensure_graph(
    pos: Tensor,
    cutoff: float,
    batch: Tensor | None = None,
    cell: Tensor | None = None,
    pbc: Tensor | None = None,
    edge_index: Tensor | None = None,
    cell_offsets: Tensor | None = None,
    backend: str = "auto",
    skin: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """The neighbour list of a batch: ``(edge_index, cell_offsets)`` as given (e.g. cached by a data
    module), else built by :func:`~pyg_equireann.graph.neighbors.build_graph` within ``cutoff + skin`` (Å).

    Every model and caller that may lack a graph goes through here. Before building a periodic list,
    :func:`~pyg_equireann.graph.checks.check_structure` rejects NaN/inf positions and cells denser than
    :data:`~pyg_equireann.graph.checks.MAX_ATOM_DENSITY` within ``cutoff`` (the list could not fit in
    memory); the neighbour search checks molecules' positions itself. A given periodic
    ``edge_index`` needs its ``cell_offsets``.
    """
    if edge_index is not None:
        if cell is not None and cell_offsets is None:
            raise ValueError("a precomputed periodic edge_index needs its cell_offsets")
        return edge_index, cell_offsets
    from pyg_equireann.graph.neighbors import build_graph  # the search backends use image_shifts above

    pos = pos.detach()
    if cell is not None:
        check_structure(pos, cutoff, batch, cell, pbc)
    return build_graph(pos, cutoff + skin, batch, cell, pbc, backend)


def reverse_edges(edge_index: Tensor, num_nodes: int, edge_shift: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """For each edge (j → i, shift S) the index of its reverse edge (i → j, −S): ``(reverse, found)``, both (E,);
    ``found`` is False (and ``reverse`` arbitrary) for an edge whose reverse is not in the list (a one-way list).

    The forward and reverse keys (j, i, S) and (i, j, −S) are sorted the same way (successive stable sorts: the
    shift's components tell several periodic images of one pair apart; S_ji = −S_ij exactly, as both are integer
    offsets times the cell), so their k-th entries are an edge and its reverse. No host sync.
    """
    src, dst = edge_index[0], edge_index[1]

    def order(first: Tensor, second: Tensor, shift: Optional[Tensor]) -> Tensor:
        perm = torch.arange(src.numel(), device=src.device)
        if shift is not None:
            for axis in (2, 1, 0):  # least significant key first
                perm = perm.index_select(0, torch.sort(shift[:, axis].index_select(0, perm), stable=True)[1])
        key = first * num_nodes + second
        return perm.index_select(0, torch.sort(key.index_select(0, perm), stable=True)[1])

    forward = order(src, dst, edge_shift)
    backward = order(dst, src, None if edge_shift is None else -edge_shift)
    reverse = torch.empty_like(forward).index_put_((forward,), backward)
    found = (src.index_select(0, reverse) == dst) & (dst.index_select(0, reverse) == src)
    if edge_shift is not None:
        found = found & (edge_shift.index_select(0, reverse) == -edge_shift).all(-1)
    return reverse, found
