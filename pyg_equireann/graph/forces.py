"""Forces and stress by automatic differentiation of any ``model(z, pos, batch, ...)`` energy."""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyg_equireann.graph.edges import ensure_graph, image_shifts


def apply_strain(pos: Tensor, batch: Tensor, cells: Optional[Tensor], epsilon: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Positions (N, 3) and cells (B, 3, 3) deformed by the symmetric part of the strain :math:`\varepsilon`
    (B, 3, 3) of each structure, :math:`x \to x(1+\varepsilon)`."""
    symmetric = 0.5 * (epsilon + epsilon.transpose(1, 2))
    strained_pos = pos + torch.einsum("ni,nij->nj", pos, symmetric.index_select(0, batch))
    return strained_pos, None if cells is None else cells + torch.bmm(cells, symmetric)


def strained_inputs(pos: Tensor, batch: Tensor, cell: Optional[Tensor], num_graphs: int, strain: bool
                    ) -> Tuple[List[Tensor], Tensor, Optional[Tensor]]:
    r"""What forces and stress are derivatives with respect to: ``([pos] or [pos, ε], positions, cells)``.
    With ``strain``, a zero symmetric strain :math:`\varepsilon` (B, 3, 3) deforms positions (N, 3) and
    cells (B, 3, 3) as :math:`x \to x(1+\varepsilon)`; ``pos`` must require grad."""
    cells = None if cell is None else cell.view(-1, 3, 3).to(pos.dtype)
    if not strain:
        return [pos], pos, cells
    epsilon = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
    strained_pos, strained_cells = apply_strain(pos, batch, cells, epsilon)
    return [pos, epsilon], strained_pos, strained_cells


def _derivatives(model: Callable[..., Tensor], z: Tensor, pos: Tensor, epsilon: Optional[Tensor], batch: Tensor,
                 edge_index: Tensor, cell_offsets: Optional[Tensor], cells: Optional[Tensor], num_graphs: int,
                 create_graph: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Energy (B,), forces −∂E/∂x (N, 3) and ∂E/∂ε (B, 3, 3) (None without a strain ``epsilon``) for ``pos`` and
    ``epsilon`` that require grad: the region :func:`energy_forces_stress` compiles for ``model.compile_forces``."""
    strained_pos, strained_cells = (pos, cells) if epsilon is None else apply_strain(pos, batch, cells, epsilon)
    edge_shift = None
    if cell_offsets is not None:
        edge_shift = image_shifts(edge_index, cell_offsets.to(pos.dtype), strained_cells, batch)
    energy = model(z, strained_pos, batch, edge_index=edge_index, edge_shift=edge_shift, num_graphs=num_graphs)
    inputs = [pos] if epsilon is None else [pos, epsilon]
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
    if not create_graph:
        energy = energy.detach()  # its graph was consumed by the derivative
    return energy, -grads[0], grads[1] if epsilon is not None else None


_compiled_derivatives: Optional[Callable] = None


def compiled_derivatives(*args):
    """:func:`_derivatives` through ``torch.compile`` (one graph, the force derivative included, shapes
    dynamic): compiled on the first call of each kind (training or inference, molecules or cells), reused
    for every size after that."""
    global _compiled_derivatives
    dynamo_config = torch._dynamo.config
    if not hasattr(dynamo_config, "trace_autograd_ops"):
        raise RuntimeError(f"compiled forces (model compile=true) need a torch whose torch.compile traces "
                           f"torch.autograd.grad (2.10 or later); this is torch {torch.__version__}")
    if _compiled_derivatives is None:
        # CPU kernels on one thread: with torch 2.13's Inductor, two-thread kernels made aspirin x32
        # energy+forces 5x slower (48 vs 9.6 ms) and failed to build a periodic scatter (an assertion in
        # its vectorised atomic store); the option does not touch GPU kernels (docs/engine.md)
        _compiled_derivatives = torch.compile(_derivatives, fullgraph=True, dynamic=True, options={"cpp.threads": 1})
    # capture_dynamic_output_shape_ops: the hops' own edge list (EquiREANN passing_hop_cutoff) is a nonzero()
    with dynamo_config.patch(trace_autograd_ops=True, capture_dynamic_output_shape_ops=True):
        return _compiled_derivatives(*args)


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
    num_graphs: Optional[int] = None,
    check: bool = True,
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
        num_graphs: B (default: the number of cells, else ``batch.max() + 1``, a host sync).
        check: run ``model.check_inputs`` (elements, finite positions, overlapping atoms; one host sync)
            if the model has it. Training passes False: its data module checked every frame when it loaded.

    With a neighbour list, ``num_graphs`` and ``check=False`` the call has no host synchronisation. A model
    with ``compile_forces`` set (EquiREANN's ``compile=True``) runs energy and derivatives as one
    ``torch.compile``d graph (:func:`compiled_derivatives`), also when training on forces.
    """
    rc = float(cutoff if cutoff is not None else model.cutoff)
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    if compute_stress and cell is None:
        raise ValueError("stress needs a periodic cell")
    edge_index, cell_offsets = ensure_graph(pos, rc, batch, cell, pbc, edge_index, cell_offsets,
                                            backend=getattr(model, "neighbor_backend", "auto"))
    if num_graphs is None:
        num_graphs = cell.view(-1, 3, 3).shape[0] if cell is not None else (int(batch.max()) + 1 if len(batch) else 1)

    pos = pos.detach().requires_grad_(True)
    cells = None if cell is None else cell.view(-1, 3, 3).to(pos.dtype)
    epsilon = None
    if compute_stress:
        epsilon = torch.zeros(num_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
    if check and hasattr(model, "check_inputs"):
        edge_shift = None if cell_offsets is None else image_shifts(edge_index, cell_offsets.to(pos.dtype), cells, batch)
        model.check_inputs(z, pos.detach(), batch, edge_index, edge_shift)
    derivatives = compiled_derivatives if getattr(model, "compile_forces", False) else _derivatives
    energy, forces, virial = derivatives(model, z, pos, epsilon, batch, edge_index, cell_offsets, cells, num_graphs,
                                         create_graph)
    out = {"energy": energy, "forces": forces}
    if compute_stress:
        volume = torch.linalg.det(cells).abs()
        out["stress"] = virial / volume.view(-1, 1, 1)
    return out
