"""Building blocks of EquiREANN and REANN: cutoff and radial functions, angular basis, species
embeddings, the orbital-passing convolution and contraction, MLPs and the energy reference.

Plain ``torch.nn`` modules: nothing here imports Lightning, Hydra or ASE.
"""
from pyg_equireann.nn.conv import EquiREANNConv, OrbitalContraction
from pyg_equireann.nn.orbitals import AngularBasis, CosineCutoff, cartesian_powers, spherical_harmonics

__all__ = ["OrbitalContraction", "EquiREANNConv", "CosineCutoff", "AngularBasis", "cartesian_powers",
           "spherical_harmonics"]
