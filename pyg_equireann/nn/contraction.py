"""Contraction of centre orbitals into invariant densities (spec §1.6)."""
from typing import Optional

import torch
from torch import Tensor, nn


class OrbitalContraction(nn.Module):
    r"""Per-degree linear contraction and squared norm:

    .. math::
        P_{i,a,c} = \sum_k \Psi_{i,a,k} W_{l(a),k,c}, \qquad
        \rho_{i,c} = w_{i,c} \sum_a P_{i,a,c}^2 .

    One K×C matrix per degree l, shared by the 2l+1 components of that degree, so that
    :math:`P` rotates like :math:`\Psi` and :math:`\rho` is O(3)-invariant.

    Args:
        degrees: (A,) degree l(a) of each angular channel.
        num_radial: K.
        num_channels: C.

    Initialisation: N(0, 1/K) for every (l, k, c), independent of the number of iterations and of L
    (the reference's 4-D Xavier init scales with both, spec §9.12).
    """

    def __init__(self, degrees: Tensor, num_radial: int, num_channels: int):
        super().__init__()
        self.register_buffer("degrees", degrees.clone(), persistent=False)
        num_degrees = int(degrees.max()) + 1
        self.weight = nn.Parameter(torch.empty(num_degrees, num_radial, num_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, node_orbitals: Tensor, center_weight: Optional[Tensor] = None) -> Tensor:
        """node_orbitals Ψ (N, A, K), center_weight w (N, C) or None → density ρ (N, C)."""
        weight = self.weight.index_select(0, self.degrees)  # (A, K, C)
        contracted = torch.bmm(node_orbitals.transpose(0, 1), weight)  # (A, N, C)
        density = contracted.square().sum(0)
        if center_weight is not None:
            density = density * center_weight
        return density
