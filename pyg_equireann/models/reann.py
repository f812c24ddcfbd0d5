"""REANN, the invariant predecessor of EquiREANN, in the same code base."""
from typing import Optional, Sequence

from pyg_equireann.models.equireann import EquiREANN


class REANN(EquiREANN):
    r"""REANN (Zhang, Xia, Jiang, J. Chem. Phys. 156, 114801 (2022)): recursively embedded atom
    neural network with invariant message passing only (spec §2.1).

    Orbitals use REANN's Cartesian angular basis :math:`f(d_{ij})\, r_{ij}^{\otimes l}` (all
    :math:`3^l` ordered products of the raw edge vector, l ≤ L), Gaussians and coefficients indexed
    by the neighbour element, one contraction H shared by all iterations, no centre weight, and one
    message network and one readout network per element:

    .. math::
        \rho_{i,c} = \sum_a \Big(\sum_k H_{l(a),k,c} \sum_j c_{j,k} O_{ij,a,k}\Big)^2, \quad
        c^{(t)}_j = c^{(t-1)}_j + M_t^{(Z_j)}(\rho^{(t-1)}_j), \quad
        E = \sum_i E^0_{Z_i} + s\,\Phi^{(Z_i)}(\rho^{(T)}_i) + b.

    Differences from the reference REANN package: Gaussians are :math:`\exp(-(\alpha(d-\mu))^2)`
    (its free :math:`\eta` in :math:`\exp(\eta(d-\mu)^2)` can turn positive, spec §9.15); the
    contraction is initialised independently per l; per-element E0, scale and shift as in
    :class:`EquiREANN`; plain (not residual) MLPs. ``cutoff`` defaults to 4 Å, like EquiREANN, so that
    the two see the same neighbours (REANN's own default is 5 Å); the other defaults are REANN's
    (C = K(K+1)/2·(L+1) = 108, T = 1, 128-wide networks with LayerNorm).

    Args:
        elements: atomic numbers the model is built for (one readout and message net each).
        equivariant_passing: also pass the neighbours' Cartesian orbitals (valid, as rank-l tensors
            rotate; an extra variant, off for REANN).
        Other arguments as in :class:`EquiREANN`.
    """

    def __init__(
        self,
        cutoff: float = 4.0,
        max_l: int = 2,
        num_radial: int = 8,
        num_channels: Optional[int] = None,
        num_iterations: int = 1,
        equivariant_passing: bool = False,
        avg_num_neighbors: Optional[float] = None,
        elements: Sequence[int] = (1, 6, 7, 8),
        message_hidden: Sequence[int] = (128, 128),
        readout_hidden: Sequence[int] = (128, 128),
        layer_norm: bool = True,
        neighbor_backend: str = "auto",
        compile: bool = False,
    ):
        if num_channels is None:
            num_channels = num_radial * (num_radial + 1) // 2 * (max_l + 1)
        super().__init__(
            cutoff=cutoff,
            max_l=max_l,
            num_radial=num_radial,
            num_channels=num_channels,
            num_iterations=num_iterations,
            equivariant_passing=equivariant_passing,
            avg_num_neighbors=avg_num_neighbors,
            elements=elements,
            angular="cartesian",
            species_embedding="neighbor",
            center_weight=False,
            shared_contraction=True,
            per_element_readout=True,
            per_element_messages=True,
            message_hidden=message_hidden,
            readout_hidden=readout_hidden,
            layer_norm=layer_norm,
            neighbor_backend=neighbor_backend,
            compile=compile,
        )
