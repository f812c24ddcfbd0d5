"""Potentials: EquiREANN, REANN, and adapters that give PyG's and MACE's models the same interface
``model(z, pos, batch, cell=None, pbc=None) -> energy``."""
from pyg_equireann.models.equireann import EquiREANN
from pyg_equireann.models.reann import REANN

__all__ = ["EquiREANN", "REANN"]
