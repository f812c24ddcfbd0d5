"""Primitive atomic orbitals of EquiREANN/REANN, edge by edge (spec §1.1–§1.4):

    O_ij,a,k = f(d_ij) · exp(−(α_ij,k (d_ij − μ_ij,k))²) · Y_a(r̂_ij)

* :class:`CosineCutoff` — the smooth cutoff f(d) (E,);
* :class:`AngularBasis` — real spherical harmonics Y_a (EquiREANN) or Cartesian tensor powers (REANN) (E, A);
* species embeddings — :class:`PairEmbedding` (element pair → coefficients c⁰ and Gaussian widths α and
  centres μ, (E, K) each), :class:`NeighborTableEmbedding` (REANN: tables indexed by the neighbour's element)
  and :class:`CenterWeight` (centre element → density weights w_i, (N, C)).
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from pyg_equireann.nn.elements import MAX_Z
from pyg_equireann.nn.readout import MLP


# --------------------------------------------------------------------------------------- cutoff
class CosineCutoff(nn.Module):
    r"""Squared cosine cutoff :math:`f(d) = (\tfrac12\cos(\pi d / r_c) + \tfrac12)^2` for
    :math:`d \le r_c`, zero beyond.

    Near :math:`r_c`, :math:`f \approx (\pi (r_c - d)/r_c)^4/16`: the function and its first three
    derivatives vanish there, so energies and forces are continuous as a neighbour crosses the cutoff.

    Args:
        cutoff: cutoff radius :math:`r_c` (Å).
    """

    def __init__(self, cutoff: float):
        super().__init__()
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = float(cutoff)

    def forward(self, distances: Tensor) -> Tensor:
        """distances (E,) in Å → cutoff values (E,)."""
        inside = distances < self.cutoff
        value = (0.5 * torch.cos(distances * (math.pi / self.cutoff)) + 0.5) ** 2
        return torch.where(inside, value, torch.zeros_like(value))

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}"


# -------------------------------------------------------------------------------- angular basis
def spherical_harmonics(vectors: Tensor, max_l: int) -> Tensor:
    r"""Real spherical harmonics :math:`Y_{lm}` up to ``max_l`` by recurrence (spec §1.4).

    Orthonormal on the unit sphere, with the Condon–Shortley phase; channel
    :math:`a = l^2 + l + m`. Given unit vectors this returns :math:`Y_{lm}(\hat u)`; given
    non-unit vectors it returns the solid harmonics :math:`r^l Y_{lm}(\hat r)`.

    Args:
        vectors: (E, 3) Cartesian vectors.
        max_l: highest degree L (any L ≥ 0).

    Returns:
        (E, (L+1)²) tensor.
    """
    if max_l < 0:
        raise ValueError(f"max_l must be >= 0, got {max_l}")
    x, y, z = vectors.unbind(-1)
    # Y[l][l + m] holds Y_{l,m}.
    Y: List[List[Tensor]] = [[torch.full_like(x, 0.5 / math.sqrt(math.pi))]]
    if max_l >= 1:
        c1 = math.sqrt(3.0 / (4.0 * math.pi))
        Y.append([-c1 * y, c1 * z, -c1 * x])
    if max_l >= 2:
        r2 = x * x + y * y + z * z
    for l in range(2, max_l + 1):
        prev, prev2 = Y[l - 1], Y[l - 2]
        row: List[Tensor] = [x] * (2 * l + 1)
        s = -math.sqrt((2 * l + 1) / (2 * l))
        # sectoral, m = ±l
        row[2 * l] = s * (x * prev[2 * l - 2] - y * prev[0])
        row[0] = s * (x * prev[0] + y * prev[2 * l - 2])
        # next-to-sectoral, m = ±(l-1)
        t = math.sqrt(2 * l + 1)
        row[2 * l - 1] = t * z * prev[2 * l - 2]
        row[1] = t * z * prev[0]
        for m in range(-(l - 2), l - 1):
            a = math.sqrt((4 * l * l - 1) / (l * l - m * m))
            b = -math.sqrt(((l - 1) ** 2 - m * m) / (4 * (l - 1) ** 2 - 1))
            row[l + m] = a * (z * prev[l - 1 + m] + b * r2 * prev2[l - 2 + m])
        Y.append(row)
    return torch.stack([y_lm for row in Y for y_lm in row], dim=-1)


def spherical_degrees(max_l: int) -> Tensor:
    """Degree l of each spherical-harmonic channel a = l² + l + m: ((L+1)²,) long."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(max_l + 1)])


def cartesian_powers(vectors: Tensor, max_l: int) -> Tensor:
    r"""REANN's Cartesian angular basis: blocks :math:`r^{\otimes l}` (all :math:`3^l` ordered
    products of the raw, un-normalised vector's components) for l = 0..L, concatenated.

    Since :math:`\sum_\alpha (r_{ij})_\alpha^{\otimes l}(r_{ik})_\alpha^{\otimes l} = (r_{ij}\cdot r_{ik})^l`,
    densities built on it expand in powers of cos θ. Each block rotates as a rank-l tensor.

    Args:
        vectors: (E, 3).
        max_l: highest rank L.

    Returns:
        (E, Σ_l 3^l) tensor.
    """
    blocks = [torch.ones_like(vectors[:, :1])]
    for _ in range(max_l):
        blocks.append((blocks[-1].unsqueeze(-1) * vectors.unsqueeze(1)).flatten(1))
    return torch.cat(blocks, dim=-1)


def cartesian_degrees(max_l: int) -> Tensor:
    """Rank l of each Cartesian channel: (Σ_l 3^l,) long."""
    return torch.cat([torch.full((3**l,), l, dtype=torch.long) for l in range(max_l + 1)])


class AngularBasis(nn.Module):
    """Angular part of the primitive orbitals.

    Args:
        max_l: highest degree L.
        kind: ``"spherical"`` (real SH of the unit edge vector, (L+1)² channels; EquiREANN) or
            ``"cartesian"`` (tensor powers of the raw edge vector, Σ 3^l channels; REANN).
    """

    def __init__(self, max_l: int, kind: str = "spherical"):
        super().__init__()
        if kind not in ("spherical", "cartesian"):
            raise ValueError(f"angular basis must be 'spherical' or 'cartesian', got {kind!r}")
        if max_l < 0:
            raise ValueError(f"max_l must be >= 0, got {max_l}")
        self.max_l = int(max_l)
        self.kind = kind
        degrees = spherical_degrees(max_l) if kind == "spherical" else cartesian_degrees(max_l)
        self.register_buffer("degrees", degrees, persistent=False)

    @property
    def num_angular(self) -> int:
        """Number A of angular channels: (L+1)² spherical, Σ_l 3^l Cartesian."""
        return int(self.degrees.numel())

    def forward(self, edge_vectors: Tensor, edge_lengths: Tensor) -> Tensor:
        """edge_vectors (E, 3) Å, edge_lengths (E,) Å → (E, A)."""
        if self.kind == "spherical":
            return spherical_harmonics(edge_vectors / edge_lengths.unsqueeze(-1), self.max_l)
        return cartesian_powers(edge_vectors, self.max_l)

    def extra_repr(self) -> str:
        return f"max_l={self.max_l}, kind={self.kind!r}, num_angular={self.num_angular}"


# --------------------------------------------------------------------------- species embeddings
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

    def forward(self, species: Tensor, atom_species: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """species (S,) atomic numbers, atom_species (N,) index into them, edge_index (2, E)
        [neighbour j, centre i] → c⁰, α, μ, each (E, K)."""
        s = species.numel()
        layers = list(self.mlp)
        # the first layer of the one-hot pair [Z_i, Z_j] is a sum of two weight columns (no (S², 238) one-hot)
        weight, bias = layers[0].weight, layers[0].bias
        centre = weight.index_select(1, species).t()  # (S, h)
        neighbour = weight.index_select(1, species + (MAX_Z + 1)).t()
        x = ((centre.unsqueeze(1) + neighbour.unsqueeze(0)) + bias).view(s * s, -1)
        for layer in layers[1:]:
            x = layer(x)  # (S², 3K)
        pair_index = atom_species.index_select(0, edge_index[1]) * s + atom_species.index_select(0, edge_index[0])
        return x.index_select(0, pair_index).split(self.num_radial, dim=-1)


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

    def forward(self, species: Tensor, atom_species: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
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

    def forward(self, species: Tensor, atom_species: Tensor) -> Tensor:
        """species (S,), atom_species (N,) → (N, C)."""
        layers = list(self.mlp)
        # the first layer of a one-hot element is a weight column (no one_hot: it syncs to check its range)
        x = layers[0].weight.index_select(1, species).t() + layers[0].bias
        for layer in layers[1:]:
            x = layer(x)
        return x.index_select(0, atom_species)
