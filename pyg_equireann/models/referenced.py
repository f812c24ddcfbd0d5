"""Any energy model (PyG's SchNet, DimeNet++, ViSNet, MACE) as a :class:`~pyg_equireann.models.base.Potential`."""
from typing import List, Optional

import torch
from torch import Tensor, nn

from pyg_equireann.graph.checks import check_finite_positions
from pyg_equireann.models.base import Potential
from pyg_equireann.nn.elements import check_atomic_numbers


class ReferencedModel(Potential):
    """Gives any ``model(z, pos, batch) -> (B,) or (B, 1)`` (e.g. PyG's SchNet, DimeNet++, ViSNet) the
    same per-element reference energies, scale and shift as EquiREANN, so that every model is trained
    on the same targets: E = Σ_i (E0[Z_i] + b) + s·model(z, pos, batch).

    The wrapped model builds its own neighbour list; it takes ``cell``/``pbc`` if it declares
    ``supports_pbc = True`` (as :class:`~pyg_equireann.models.mace.MACEPotential` does)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cutoff = getattr(model, "cutoff", None)
        self.supports_pbc = bool(getattr(model, "supports_pbc", False))

    def known_elements(self) -> Optional[List[int]]:
        """Atomic numbers with a reference energy E0, i.e. those seen in the training data (None before
        :meth:`set_energy_statistics`, when every E0 is zero)."""
        known = (self.atomic_energies != 0).nonzero().flatten()
        return [int(z) for z in known] if known.numel() else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before avg_num_neighbors moved from the energy reference to EquiREANN
        state_dict.pop(prefix + "avg_num_neighbors", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None) -> Tensor:
        if batch is None:
            batch = torch.zeros(len(z), dtype=torch.long, device=z.device)
        # elements without a reference energy were not in the training data (unless no E0 is set at all)
        set_e0 = self.atomic_energies != 0
        check_atomic_numbers(z.long(), set_e0 if bool(set_e0.any()) else None)
        check_finite_positions(pos, batch)
        if cell is not None and (pbc is None or bool(torch.as_tensor(pbc).any())):
            if not self.supports_pbc:
                raise ValueError(f"{type(self.model).__name__} does not support periodic cells")
            raw = self.model(z, pos, batch, cell=cell, pbc=pbc).view(-1)
        else:
            raw = self.model(z, pos, batch).view(-1)
        num_graphs = raw.shape[0]
        counts = torch.bincount(batch, minlength=num_graphs).double()
        e0 = torch.zeros(num_graphs, dtype=torch.float64, device=z.device).index_add_(0, batch, self.atomic_energies[z])
        return e0 + self.energy_shift.double() * counts + self.energy_scale.double() * raw.double()
