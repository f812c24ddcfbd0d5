"""Smooth cutoff function of EquiREANN (spec §1.1)."""
import math

import torch
from torch import Tensor, nn


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
