"""pyg_equireann: EquiREANN and REANN interatomic potentials for PyTorch Geometric."""
from .contraction import OrbitalContraction
from .conv import EquiREANNConv
from .cutoff import CosineCutoff
from .equireann import EquiREANN
from .forces import energy_forces_stress
from .harmonics import AngularBasis, cartesian_powers, spherical_harmonics
from .neighbors import build_graph, radius_graph, radius_graph_pbc
from .reann import REANN
from .statistics import compute_statistics

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
