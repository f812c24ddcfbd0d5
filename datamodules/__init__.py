"""Lightning data modules for pyg_equireann (MD17 family and ASE-readable files).

Every structure is a PyG ``Data`` with ``z``, ``pos`` (Å), ``energy`` (eV, float64), ``forces``
(eV/Å), optional ``stress`` (eV/Å³), ``cell``/``pbc`` (periodic only), ``edge_index`` (and
``cell_offsets``) from :func:`pyg_equireann.build_graph`, and ``idx`` (frame in its source file).
Processed graphs and training-set statistics are cached next to the data.
"""
from pyg_equireann.datamodules.base import PotentialDataModule, default_data_root, read_isolated_atoms
from pyg_equireann.datamodules.md17 import KCAL_PER_MOL, MD17DataModule, available_molecules
from pyg_equireann.datamodules.presets import acac_datamodule, cumulene_datamodule
from pyg_equireann.datamodules.structures import StructureDataset
from pyg_equireann.datamodules.xyz import XYZDataModule

__all__ = [
    "PotentialDataModule",
    "MD17DataModule",
    "XYZDataModule",
    "StructureDataset",
    "acac_datamodule",
    "cumulene_datamodule",
    "available_molecules",
    "read_isolated_atoms",
    "KCAL_PER_MOL",
    "default_data_root",
]
