"""Per-element reference energies, energy scale and shift: shared by EquiREANN and model adapters."""
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from pyg_equireann.nn.elements import MAX_Z


class EnergyReference(nn.Module):
    """Holds E0 per element (float64, also in float32 models), an energy scale s and a per-atom
    shift b, so that E = Σ_i E0[Z_i] + s·ε_i + b for a model's raw atomic outputs ε_i."""

    def __init__(self):
        super().__init__()
        self.register_buffer("atomic_energies", torch.zeros(MAX_Z + 1, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("energy_shift", torch.tensor(0.0))

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
    ) -> None:
        """Set per-element reference energies E0 ({Z: eV} or a (119,) tensor), the energy scale s (eV)
        and per-atom shift b (eV), e.g. from :func:`pyg_equireann.training.statistics.compute_statistics`."""
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

    def total_energy(self, z: Tensor, raw_atomic: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """Atomic energies E0[Z_i] + s·ε_i + b (N,) and their per-graph sums (B,), in float64."""
        atomic = self.atomic_energies[z] + (self.energy_scale * raw_atomic + self.energy_shift).double()
        energy = torch.zeros(num_graphs, dtype=torch.float64, device=z.device).index_add_(0, batch, atomic)
        return atomic, energy
