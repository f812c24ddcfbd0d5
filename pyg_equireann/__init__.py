"""pyg_equireann: EquiREANN and REANN interatomic potentials for PyTorch Geometric."""
from pyg_equireann.nn.conv import EquiREANNConv, OrbitalContraction
from pyg_equireann.models.equireann import EquiREANN
from pyg_equireann.graph.forces import energy_forces_stress
from pyg_equireann.nn.orbitals import AngularBasis, CosineCutoff, cartesian_powers, spherical_harmonics
from pyg_equireann.graph.neighbors import build_graph, radius_graph, radius_graph_pbc
from pyg_equireann.models.reann import REANN
from pyg_equireann.training.statistics import compute_statistics

__version__ = "0.1.0"

__all__ = [
    "EquiREANN",
    "REANN",
    "EquiREANNConv",
    "OrbitalContraction",
    "CosineCutoff",
    "AngularBasis",
    "spherical_harmonics",
    "cartesian_powers",
    "energy_forces_stress",
    "build_graph",
    "radius_graph",
    "radius_graph_pbc",
    "compute_statistics",
]
