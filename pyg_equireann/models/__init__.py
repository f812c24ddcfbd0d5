"""Potentials: EquiREANN, REANN, and adapters that give PyG's and MACE's models the same interface
``model(z, pos, batch, cell=None, pbc=None) -> energy`` (:class:`~pyg_equireann.models.base.Potential`)."""
from pyg_equireann.models.base import Potential
from pyg_equireann.models.equireann import EquiREANN
from pyg_equireann.models.reann import REANN
from pyg_equireann.models.referenced import ReferencedModel

__all__ = ["Potential", "EquiREANN", "REANN", "ReferencedModel"]
