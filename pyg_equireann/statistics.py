"""Dataset statistics that set a model's energy reference, scale and neighbour normalisation."""
from typing import Dict, Iterable, Optional

import torch

from .elements import MAX_Z
from .neighbors import build_graph


def compute_statistics(
    data_list: Iterable,
    cutoff: float,
    energy_key: str = "energy",
    forces_key: Optional[str] = "forces",
    atomic_energies: Optional[Dict[int, float]] = None,
    precomputed_edges: bool = False,
) -> Dict[str, object]:
    """Per-element reference energies, energy scale and shift, and average neighbour count.

    Args:
        data_list: graphs with ``z`` (N,), ``pos`` (N, 3) Å, an energy (eV) under ``energy_key``,
            optionally forces (N, 3) eV/Å under ``forces_key`` and ``cell`` (3, 3) / ``pbc`` (3,).
        cutoff: neighbour cutoff (Å) for the average neighbour count.
        atomic_energies: known isolated-atom energies {Z: eV}; fitted by least squares when None.
        precomputed_edges: count neighbours from each structure's ``edge_index`` (built with this
            ``cutoff``, as the data modules do) instead of building the neighbour list again.

    Returns:
        dict with ``atomic_energies`` {Z: eV}, ``shift`` (mean per-atom residual energy, eV),
        ``scale`` (RMS force component, eV/Å, or the per-atom residual energy std without forces)
        and ``avg_num_neighbors`` — the keyword arguments of
        :meth:`~pyg_equireann.EquiREANN.set_energy_statistics`.
    """
    counts, energies, num_atoms, forces_sq, num_force, num_edges = [], [], [], 0.0, 0, 0
    for index, data in enumerate(data_list):
        z = data.z.long()
        energy = getattr(data, energy_key, None)
        if energy is None:
            raise KeyError(f"structure {index} has no energy under key {energy_key!r}")
        counts.append(torch.bincount(z, minlength=MAX_Z + 1).double())
        energies.append(float(energy))
        num_atoms.append(len(z))
        if forces_key is not None and getattr(data, forces_key, None) is not None:
            f = getattr(data, forces_key).double()
            forces_sq += float(f.square().sum())
            num_force += f.numel()
        edge_index = getattr(data, "edge_index", None) if precomputed_edges else None
        if edge_index is None:
            cell = getattr(data, "cell", None)
            edge_index, _ = build_graph(data.pos, cutoff, None, cell, getattr(data, "pbc", None))
        num_edges += edge_index.shape[1]
    if not energies:
        raise ValueError("compute_statistics got no structures")
    A = torch.stack(counts)
    y = torch.tensor(energies, dtype=torch.float64)
    n = torch.tensor(num_atoms, dtype=torch.float64)
    present = (A.sum(0) > 0).nonzero().flatten()
    e0 = torch.zeros(MAX_Z + 1, dtype=torch.float64)
    if atomic_energies is None:
        solution = torch.linalg.lstsq(A[:, present], y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        e0[present] = solution
    else:
        missing = [int(zz) for zz in present if int(zz) not in atomic_energies]
        if missing:
            raise KeyError(f"atomic_energies has no entry for elements {missing}")
        for zz, value in atomic_energies.items():
            e0[int(zz)] = float(value)
    residual_per_atom = (y - A @ e0) / n
    shift = float(residual_per_atom.mean())
    if num_force:
        scale = (forces_sq / num_force) ** 0.5
    else:
        scale = float(residual_per_atom.std()) if len(energies) > 1 else 1.0
    return {
        "atomic_energies": {int(zz): float(e0[zz]) for zz in present},
        "shift": shift,
        "scale": scale if scale > 0 else 1.0,
        "avg_num_neighbors": num_edges / float(n.sum()),
    }
