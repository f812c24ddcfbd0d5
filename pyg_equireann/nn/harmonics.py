"""Angular bases: real spherical harmonics (EquiREANN) and Cartesian tensor powers (REANN)."""
import math
from typing import List

import torch
from torch import Tensor, nn


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
