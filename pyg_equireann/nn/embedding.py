"""Species embeddings: per-edge orbital coefficients and Gaussian parameters, per-atom centre weights."""
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from pyg_equireann.nn.elements import MAX_Z
from pyg_equireann.nn.mlp import MLP


def _gaussian_init(num_radial: int, cutoff: float) -> Tuple[Tensor, Tensor]:
    """Initial inverse widths α (K,) and centres μ (K,): centres spread evenly over [0, r_c] with widths
    matched to their spacing (the reference draws μ in [0, √r_c] with α = 1, spec §9.9)."""
    mu = torch.linspace(0.0, cutoff, num_radial)
    alpha = torch.full((num_radial,), max(num_radial - 1, 1) / cutoff)
    return alpha, mu


class PairEmbedding(nn.Module):
    r"""EquiREANN's pair embedding g: the ordered element pair (centre :math:`Z_i`, neighbour
    :math:`Z_j`) → initial orbital coefficients :math:`c^0_{ij}`, inverse Gaussian widths
    :math:`\alpha_{ij}` and centres :math:`\mu_{ij}` (each K values).

    The input is the concatenation of the two one-hot element vectors, which is injective; the
    reference fed the scalar :math:`Z_iZ_j/(Z_i+Z_j)`, under which (C, Mg) ≡ (O, O) (spec §9.8). The MLP
    is evaluated once per distinct pair present and gathered onto the edges (identical result, far
    cheaper than once per edge).

    Args:
        num_radial: K.
        cutoff: r_c (Å), sets the initial Gaussian centres and widths.
        hidden: hidden widths of g.
        layer_norm: LayerNorm between hidden layers (on in the reference).
    """

    def __init__(self, num_radial: int, cutoff: float, hidden: Sequence[int] = (8, 8), layer_norm: bool = True):
        super().__init__()
        self.num_radial = num_radial
        self.cutoff = cutoff
        self.mlp = MLP(2 * (MAX_Z + 1), hidden, 3 * num_radial, layer_norm=layer_norm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        alpha, mu = _gaussian_init(self.num_radial, self.cutoff)
        self.mlp.output_bias = torch.cat([torch.randn(self.num_radial), alpha, mu])
        self.mlp.reset_parameters()

    def forward(self, species: Tensor, atom_species: Tensor, edge_index: Tensor,
                dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
        """species (S,) distinct atomic numbers, atom_species (N,) index into them, edge_index (2, E)
        [neighbour j, centre i] → c⁰, α, μ, each (E, K)."""
        s = species.numel()
        index = atom_species
        onehot = torch.zeros(s, s, 2 * (MAX_Z + 1), dtype=dtype, device=species.device)
        pair = torch.arange(s, device=species.device)
        onehot[pair, :, species] = 1.0  # centre element
        onehot[:, pair, MAX_Z + 1 + species] = 1.0  # neighbour element
        table = self.mlp(onehot.view(s * s, -1))  # (S², 3K)
        pair_index = index[edge_index[1]] * s + index[edge_index[0]]
        return table.index_select(0, pair_index).split(self.num_radial, dim=-1)


class NeighborTableEmbedding(nn.Module):
    r"""REANN's species dependence: :math:`c^0`, :math:`\alpha`, :math:`\mu` are free tables
    indexed by the neighbour element only.

    REANN's Gaussian :math:`\exp(\eta(d-\mu)^2)` with unconstrained η can turn into a growing
    function (spec §9.15); here :math:`\eta = -\alpha^2`, which always decays.
    """

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.num_radial = num_radial
        self.cutoff = cutoff
        self.coefficients = nn.Parameter(torch.empty(MAX_Z + 1, num_radial))
        self.alpha = nn.Parameter(torch.empty(MAX_Z + 1, num_radial))
        self.mu = nn.Parameter(torch.empty(MAX_Z + 1, num_radial))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        alpha, mu = _gaussian_init(self.num_radial, self.cutoff)
        with torch.no_grad():
            self.coefficients.fill_(1.0)
            self.alpha.copy_(alpha.expand_as(self.alpha))
            self.mu.copy_(mu.expand_as(self.mu))

    def forward(self, species: Tensor, atom_species: Tensor, edge_index: Tensor,
                dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
        zj = species[atom_species[edge_index[0]]]
        return self.coefficients[zj], self.alpha[zj], self.mu[zj]


class CenterWeight(nn.Module):
    r"""EquiREANN's centre weight h: element :math:`Z_i` → :math:`w_i \in \mathbb{R}^C`, which
    multiplies the density. Evaluated once per distinct element present."""

    def __init__(self, num_channels: int, hidden: Sequence[int] = (8, 8), layer_norm: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.mlp = MLP(MAX_Z + 1, hidden, num_channels, layer_norm=layer_norm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference draws N(0,1)/n̄ with n̄ a padding-buffer size (spec §9.10); the scale of Ψ is
        # handled by the neighbour normalisation instead.
        self.mlp.output_bias = torch.randn(self.num_channels)
        self.mlp.reset_parameters()

    def forward(self, species: Tensor, atom_species: Tensor, dtype: torch.dtype) -> Tensor:
        """species (S,), atom_species (N,) → (N, C)."""
        onehot = nn.functional.one_hot(species, MAX_Z + 1).to(dtype)
        return self.mlp(onehot).index_select(0, atom_species)
