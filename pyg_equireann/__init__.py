"""pyg_equireann: EquiREANN and REANN interatomic potentials for PyTorch Geometric."""
import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), so that `import pyg_equireann.cli` (every console
# script) does not import torch, torch_geometric and Lightning (~7 s) before Hydra has composed the config: a
# mistyped override or an unwritable folder is reported in about a second.
_EXPORTS = {
    "EquiREANN": "pyg_equireann.models.equireann",
    "REANN": "pyg_equireann.models.reann",
    "EquiREANNConv": "pyg_equireann.nn.conv",
    "OrbitalContraction": "pyg_equireann.nn.conv",
    "CosineCutoff": "pyg_equireann.nn.orbitals",
    "AngularBasis": "pyg_equireann.nn.orbitals",
    "spherical_harmonics": "pyg_equireann.nn.orbitals",
    "cartesian_powers": "pyg_equireann.nn.orbitals",
    "energy_forces_stress": "pyg_equireann.graph.forces",
    "build_graph": "pyg_equireann.graph.neighbors",
    "radius_graph": "pyg_equireann.graph.neighbors",
    "radius_graph_pbc": "pyg_equireann.graph.neighbors",
    "compute_statistics": "pyg_equireann.training.statistics",
}

__all__ = [
    "EquiREANN", "REANN", "EquiREANNConv", "OrbitalContraction", "CosineCutoff", "AngularBasis", "spherical_harmonics",
    "cartesian_powers", "energy_forces_stress", "build_graph", "radius_graph", "radius_graph_pbc", "compute_statistics",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'pyg_equireann' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # for type checkers and IDEs
    from pyg_equireann.graph.forces import energy_forces_stress
    from pyg_equireann.graph.neighbors import build_graph, radius_graph, radius_graph_pbc
    from pyg_equireann.models.equireann import EquiREANN
    from pyg_equireann.models.reann import REANN
    from pyg_equireann.nn.conv import EquiREANNConv, OrbitalContraction
    from pyg_equireann.nn.orbitals import AngularBasis, CosineCutoff, cartesian_powers, spherical_harmonics
    from pyg_equireann.training.statistics import compute_statistics
