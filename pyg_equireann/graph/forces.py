"""Forces and stress by automatic differentiation of any ``model(z, pos, batch, ...)`` energy."""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyg_equireann.graph.edges import ensure_graph, image_shifts


def strained_inputs(pos: Tensor, batch: Tensor, cell: Optional[Tensor], num_graphs: int, strain: bool
                    ) -> Tuple[List[Tensor], Tensor, Optional[Tensor]]:
    r"""What forces and stress are derivatives with respect to: ``([pos] or [pos, ε], positions, cells)``.
    With ``strain``, a zero symmetric strain :math:`\varepsilon` (B, 3, 3) deforms positions (N, 3) and
    cells (B, 3, 3) as :math:`x \to x(1+\varepsilon)`; ``pos`` must require grad."""
    cells = None if cell is None else cell.view(-1, 3, 3).to(pos.dtype)
    if not strain:
        return [pos], pos, cells
    epsilon = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
    symmetric = 0.5 * (epsilon + epsilon.transpose(1, 2))
    strained_pos = pos + torch.einsum("ni,nij->nj", pos, symmetric[batch])
    return [pos, epsilon], strained_pos, cells + torch.bmm(cells, symmetric)


def energy_forces_stress(
    model: Callable[..., Tensor],
    z: Tensor,
    pos: Tensor,
    batch: Optional[Tensor] = None,
    cell: Optional[Tensor] = None,
    pbc: Optional[Tensor] = None,
    compute_stress: bool = False,
    create_graph: bool = False,
    cutoff: Optional[float] = None,
    edge_index: Optional[Tensor] = None,
    cell_offsets: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    r"""Energy (B,), forces :math:`F = -\partial E/\partial x` (N, 3) and, for periodic graphs,
    stress :math:`\sigma = V^{-1}\,\partial E/\partial \varepsilon` (B, 3, 3) by the strain
    derivative (spec §6, ASE sign convention, eV/Å³).

    The neighbour list (with integer cell offsets) is built once without gradients; a symmetric
    strain :math:`\varepsilon` then deforms positions and cell, :math:`x \to x(1+\varepsilon)`,
    shifts are recomputed from the offsets, and one backward pass gives forces and virial.

    Args:
        model: a module with ``forward(z, pos, batch, edge_index=..., edge_shift=...)`` and a
            ``cutoff`` attribute (or pass ``cutoff``), e.g. :class:`~pyg_equireann.EquiREANN`.
        z, pos, batch, cell, pbc: as for :meth:`EquiREANN.forward`.
        compute_stress: also return ``stress`` (needs ``cell``).
        create_graph: keep the graph of the derivatives (for training on forces).
        edge_index, cell_offsets: a precomputed neighbour list (e.g. cached by a data module) with
            integer cell offsets for periodic graphs; built by
            :func:`~pyg_equireann.graph.edges.ensure_graph` when None (ValueError for NaN/inf positions
            and cells denser than :data:`~pyg_equireann.graph.checks.MAX_ATOM_DENSITY`).
    """
    rc = float(cutoff if cutoff is not None else model.cutoff)
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    if compute_stress and cell is None:
        raise ValueError("stress needs a periodic cell")
    edge_index, cell_offsets = ensure_graph(pos, rc, batch, cell, pbc, edge_index, cell_offsets,
                                            backend=getattr(model, "neighbor_backend", "auto"))
    num_graphs = cell.view(-1, 3, 3).shape[0] if cell is not None else (int(batch.max()) + 1 if len(batch) else 1)

    pos = pos.detach().requires_grad_(True)
    inputs, strained_pos, cells = strained_inputs(pos, batch, cell, num_graphs, compute_stress)
    edge_shift = None
    if cell_offsets is not None:
        edge_shift = image_shifts(edge_index, cell_offsets.to(pos.dtype), cells, batch)
    energy = model(z, strained_pos, batch, edge_index=edge_index, edge_shift=edge_shift)
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
    out = {"energy": energy, "forces": -grads[0]}
    if compute_stress:
        volume = torch.linalg.det(cell.view(-1, 3, 3).to(pos.dtype)).abs()
        out["stress"] = grads[1] / volume.view(-1, 1, 1)
    return out
