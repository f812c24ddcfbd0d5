"""Per-element reference energies, energy scale and shift: shared by EquiREANN and model wrappers."""
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from pyg_equireann.nn.elements import MAX_Z, check_atomic_numbers


class EnergyReference(nn.Module):
    """Holds E0 per element (float64, also in float32 models), an energy scale s and a per-atom
    shift b, so that E = Σ_i E0[Z_i] + s·ε_i + b for a model's raw atomic outputs ε_i."""

    def __init__(self):
        super().__init__()
        self.register_buffer("atomic_energies", torch.zeros(MAX_Z + 1, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))
        self.register_buffer("avg_num_neighbors", torch.tensor(1.0))

    def _apply(self, fn, recurse=True):
        # Keep the reference energies in float64 through .float()/.half()/.to(dtype): totals are
        # ~1e4 eV while errors are meV.
        atomic_energies = self.atomic_energies
        super()._apply(fn, recurse)
        self.atomic_energies = atomic_energies.to(self.atomic_energies.device, torch.float64)
        return self

    @torch.no_grad()
    def set_energy_statistics(
        self,
        atomic_energies: Union[Dict[int, float], Tensor, None] = None,
        scale: Optional[float] = None,
        shift: Optional[float] = None,
        avg_num_neighbors: Optional[float] = None,
    ) -> None:
        """Set per-element reference energies E0 ({Z: eV} or a (119,) tensor), the energy scale s (eV)
        and per-atom shift b (eV), and the average neighbour count used for normalisation, e.g. from
        :func:`pyg_equireann.training.statistics.compute_statistics`."""
        if atomic_energies is not None:
            if isinstance(atomic_energies, dict):
                for z, e0 in atomic_energies.items():
                    self.atomic_energies[int(z)] = float(e0)
            else:
                self.atomic_energies.copy_(torch.as_tensor(atomic_energies))
        if scale is not None:
            self.energy_scale.fill_(float(scale))
        if shift is not None:
            self.energy_shift.fill_(float(shift))
        if avg_num_neighbors is not None:
            self.avg_num_neighbors.fill_(float(avg_num_neighbors))

    def known_elements(self) -> Optional[List[int]]:
        """Atomic numbers the model can predict: those with a reference energy E0 (None before
        :meth:`set_energy_statistics`, when every E0 is zero)."""
        known = (self.atomic_energies != 0).nonzero().flatten()
        return [int(z) for z in known] if known.numel() else None

    def total_energy(self, z: Tensor, raw_atomic: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """Atomic energies E0[Z_i] + s·ε_i + b (N,) and their per-graph sums (B,), in float64."""
        atomic = self.atomic_energies[z] + (self.energy_scale * raw_atomic + self.energy_shift).double()
        energy = torch.zeros(num_graphs, dtype=torch.float64, device=z.device).index_add_(0, batch, atomic)
        return atomic, energy


class ReferencedModel(EnergyReference):
    """Gives any ``model(z, pos, batch) -> (B,) or (B, 1)`` (e.g. PyG's SchNet, DimeNet++, ViSNet) the
    same per-element reference energies, scale and shift as EquiREANN, so that every model is trained
    on the same targets: E = Σ_i (E0[Z_i] + b) + s·model(z, pos, batch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cutoff = getattr(model, "cutoff", None)

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None) -> Tensor:
        if batch is None:
            batch = torch.zeros(len(z), dtype=torch.long, device=z.device)
        # elements without a reference energy were not in the training data (unless no E0 is set at all)
        set_e0 = self.atomic_energies != 0
        check_atomic_numbers(z.long(), set_e0 if bool(set_e0.any()) else None)
        if not bool(torch.isfinite(pos).all()):
            i = int((~torch.isfinite(pos).all(1)).nonzero()[0, 0])
            raise ValueError(f"atom {i} has a non-finite position (NaN or inf): {pos[i].detach().tolist()}")
        if cell is not None and (pbc is None or bool(torch.as_tensor(pbc).any())):
            if not getattr(self.model, "supports_pbc", False):
                raise ValueError(f"{type(self.model).__name__} does not support periodic cells")
            raw = self.model(z, pos, batch, cell=cell, pbc=pbc).view(-1)
        else:
            raw = self.model(z, pos, batch).view(-1)
        num_graphs = raw.shape[0]
        counts = torch.bincount(batch, minlength=num_graphs).double()
        e0 = torch.zeros(num_graphs, dtype=torch.float64, device=z.device).index_add_(0, batch, self.atomic_energies[z])
        return e0 + self.energy_shift.double() * counts + self.energy_scale.double() * raw.double()
