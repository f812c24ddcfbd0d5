"""ASE calculator for EquiREANN/REANN potentials (training checkpoints or exported TorchScript files)."""
import copy
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn

from pyg_equireann.deploy.torchscript import DeployedPotential, script_error
from pyg_equireann.graph.edges import image_shifts
from pyg_equireann.graph.edges import ensure_graph
from pyg_equireann.utils import resolve_dtype


def _set_dtype(potential: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Convert a (scripted) potential to ``dtype``, keeping the float64 reference energies."""
    if dtype is None or potential.center_weight_table.dtype == dtype:
        return potential
    atomic_energies = potential.atomic_energies.clone()
    potential = potential.to(dtype)
    potential.atomic_energies = atomic_energies.to(potential.atomic_energies.device)
    return potential


def load_potential(model: Union[str, os.PathLike, nn.Module], device: Union[str, torch.device] = "cpu",
                   dtype=None, script: bool = True) -> nn.Module:
    """A :class:`~pyg_equireann.deploy.torchscript.DeployedPotential` (scripted) from an exported ``.pt`` file,
    a training checkpoint (``.ckpt``, EMA weights) or an EquiREANN-family module.

    ``dtype`` (``"float32"``/``"float64"``): default float64 for checkpoints and modules, the file's
    own dtype for exported models.
    """
    dtype = None if dtype is None else resolve_dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        potential = None
        if path.suffix != ".ckpt":
            try:
                potential = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                if path.suffix == ".pt":
                    raise ValueError(f"{path} is not an exported pyg_equireann model (torch.jit.load failed: {exc})") from exc
        if potential is None:
            from pyg_equireann.training.module import PotentialModule

            module = PotentialModule.from_checkpoint(str(path))
            potential = DeployedPotential(module.model.to(dtype or torch.float64))
            potential = torch.jit.script(potential) if script else potential
    elif isinstance(model, (DeployedPotential, torch.jit.ScriptModule)):
        potential = model
    elif isinstance(model, nn.Module):
        inner = getattr(model, "model", model)  # a PotentialModule or the model itself
        potential = DeployedPotential(copy.deepcopy(inner).to(dtype or torch.float64))
        potential = torch.jit.script(potential) if script else potential
    else:
        raise ValueError(f"model must be a path or an nn.Module, got {type(model).__name__}")
    if not hasattr(potential, "neighbor_list") or not hasattr(potential, "cutoff"):
        raise ValueError("the model is not a pyg_equireann DeployedPotential (no cutoff/neighbor_list)")
    potential = _set_dtype(potential, dtype)
    return potential.to(device).eval()


class EquiREANNCalculator(Calculator):
    """ASE calculator: energy, free_energy (= energy), per-atom energies, forces and, for periodic
    cells, stress (eV/Å³, Voigt order).

    The neighbour list is built with ``cutoff + skin`` and reused while no atom has moved more than
    ``skin / 2`` since it was built and numbers, cell and pbc are unchanged; pairs beyond the cutoff
    contribute exactly zero (smooth cutoff), so results equal those of a fresh list.

    Structures that the Python model rejects raise the same ``ValueError``: NaN/inf positions, atoms or
    periodic images closer than 0.01 Å, and (before the neighbour list is built) periodic cells denser
    than 1 atom/Å³ (:mod:`pyg_equireann.graph.checks`).

    Args:
        model: exported model (``equireann-export``), training checkpoint or module (see
            :func:`load_potential`).
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
        self.cutoff = float(self.potential.cutoff)
        self.dtype = self.potential.center_weight_table.dtype
        self.skin = float(skin)
        self.num_neighbor_builds = 0
        self._nl = None

    def _neighbors(self, atoms):
        """Edge index and Cartesian shifts, rebuilt only when the skin criterion fails."""
        positions = atoms.get_positions()
        numbers = atoms.get_atomic_numbers()
        cell = np.asarray(atoms.get_cell())
        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        nl = self._nl
        if nl is not None and np.array_equal(nl["numbers"], numbers) and np.array_equal(nl["cell"], cell) \
                and np.array_equal(nl["pbc"], pbc):
            moved = np.sqrt(((positions - nl["positions"]) ** 2).sum(1)).max() if len(positions) else 0.0
            if moved <= 0.5 * self.skin:
                return nl["edge_index"], nl["edge_shift"]
        cell_t = torch.from_numpy(cell)
        edge_index, offsets = ensure_graph(torch.from_numpy(positions), self.cutoff, None, cell_t,
                                           torch.from_numpy(pbc), skin=self.skin)
        shift = None if offsets is None else image_shifts(edge_index, offsets, cell_t).to(self.device, self.dtype)
        self._nl = {"positions": positions.copy(), "numbers": numbers.copy(), "cell": cell.copy(), "pbc": pbc.copy(),
                    "edge_index": edge_index.to(self.device), "edge_shift": shift}
        self.num_neighbor_builds += 1
        return self._nl["edge_index"], shift

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        # the virial costs little: compute it for every periodic cell, so stress needs no second call
        want_stress = bool(atoms.pbc.any()) and abs(atoms.cell.volume) > 0
        if "stress" in properties and not want_stress:
            raise PropertyNotImplementedError("stress needs a periodic cell with non-zero volume")
        edge_index, shift = self._neighbors(atoms)  # checks the positions and the cell when it builds a list
        pos = torch.tensor(atoms.get_positions(), dtype=self.dtype, device=self.device)
        z = torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long, device=self.device)
        try:  # the potential checks the geometry (atoms or images closer than 0.01 Å)
            with torch.enable_grad():
                out = self.potential(pos, z, edge_index, shift, None, want_stress)
        except torch.jit.Error as error:  # a ValueError raised in TorchScript: re-raise it as one
            raise script_error(error) from None
        energy = float(out["energy"].sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["atomic_energies"].detach().cpu().numpy(),
            "forces": out["forces"].detach().double().cpu().numpy(),
        }
        if want_stress:
            volume = atoms.get_volume()
            stress = -out["virial"][0].detach().double().cpu().numpy() / volume
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
