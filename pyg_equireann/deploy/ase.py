"""ASE calculator for EquiREANN/REANN potentials (exported ``.pt2`` packages, training checkpoints or modules)."""
from typing import Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from pyg_equireann.deploy.package import DeployedPotential, load_potential
from pyg_equireann.graph.edges import ensure_graph

__all__ = ["EquiREANNCalculator", "DeployedPotential", "load_potential"]


class EquiREANNCalculator(Calculator):
    """ASE calculator: energy, free_energy (= energy), per-atom energies, forces and, for periodic
    cells, stress (eV/Å³, Voigt order).

    The neighbour list is built on the device (:func:`~pyg_equireann.graph.edges.ensure_graph`) with
    ``cutoff + skin`` and reused while no atom has moved more than ``skin / 2`` since it was built and
    numbers, cell and pbc are unchanged; pairs beyond the cutoff contribute exactly zero (smooth cutoff),
    so results equal those of a fresh list.

    Structures that the Python model rejects raise the same ``ValueError``: unknown elements, NaN/inf
    positions, atoms or periodic images closer than 0.01 Å, and (before the neighbour list is built)
    periodic cells denser than 1 atom/Å³ (:mod:`pyg_equireann.graph.checks`).

    Args:
        model: exported package (``equireann-export``), training checkpoint or module (see
            :func:`~pyg_equireann.deploy.package.load_potential`).
        device: ``"cpu"``, ``"cuda"``, ...
        dtype: ``"float32"`` or ``"float64"`` (default: float64, or the exported file's dtype).
        skin: neighbour-list skin in Å (0 rebuilds at every call).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, device: Union[str, torch.device] = "cpu", dtype=None, skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not skin >= 0.0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.device = torch.device(device)
        self.potential = load_potential(model, self.device, dtype)
        self.cutoff = self.potential.cutoff
        self.dtype = self.potential.dtype
        self.skin = float(skin)
        self.num_neighbor_builds = 0
        self._nl = None

    def _neighbors(self, atoms, pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor):
        """Edge index and integer cell offsets, rebuilt only when the skin criterion fails."""
        positions = atoms.get_positions()
        numbers = atoms.get_atomic_numbers()
        nl = self._nl
        if nl is not None and np.array_equal(nl["numbers"], numbers) and np.array_equal(nl["cell"], atoms.cell[:]) \
                and np.array_equal(nl["pbc"], atoms.pbc):
            moved = np.sqrt(((positions - nl["positions"]) ** 2).sum(1)).max() if len(positions) else 0.0
            if moved <= 0.5 * self.skin:
                return nl["edge_index"], nl["cell_offsets"]
        periodic = bool(atoms.pbc.any())
        edge_index, offsets = ensure_graph(pos, self.cutoff, None, cell if periodic else None,
                                           pbc if periodic else None, skin=self.skin)
        self._nl = {"positions": positions.copy(), "numbers": numbers.copy(), "cell": atoms.cell[:].copy(),
                    "pbc": atoms.pbc.copy(), "edge_index": edge_index, "cell_offsets": offsets}
        self.num_neighbor_builds += 1
        return edge_index, offsets

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        # the virial costs little: compute it for every periodic cell, so stress needs no second call
        periodic = bool(atoms.pbc.any())
        want_stress = periodic and abs(atoms.cell.volume) > 0
        if "stress" in properties and not want_stress:
            raise PropertyNotImplementedError("stress needs a periodic cell with non-zero volume")
        pos = torch.tensor(atoms.get_positions(), dtype=self.dtype, device=self.device)
        z = torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long, device=self.device)
        cell = torch.tensor(atoms.cell[:], dtype=self.dtype, device=self.device)
        pbc = torch.tensor(atoms.pbc, device=self.device)
        edge_index, offsets = self._neighbors(atoms, pos, cell, pbc)  # checks positions and cell when it builds
        out = self.potential(z, pos, edge_index, offsets, cell if periodic else None)  # checks the rest
        energy = float(out["energy"].sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["atomic_energies"].detach().cpu().numpy(),
            "forces": out["forces"].detach().double().cpu().numpy(),
        }
        if want_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"][0].detach().double().cpu().numpy())
