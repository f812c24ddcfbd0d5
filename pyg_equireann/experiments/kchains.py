"""k-chains (Joshi et al., "On the Expressive Power of Geometric Graph Neural Networks", ICML 2023).

A k-chain pair: k backbone atoms on a straight line plus one terminal atom bent off each end. The
two structures differ only by the side to which the first terminal atom bends, so every local
environment (bond lengths and the angle at each atom) is the same up to rotation; they are not
mirror images of each other (the other terminal atom stays on one side). Any model whose messages
are invariant scalars of local environments gives both the same energy at any depth; a model that
passes orientations (EquiREANN) tells them apart once information from one end reaches the other.
"""
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor


def kchain_pair(k: int, bond: float = 1.0, dtype=torch.float64) -> Tuple[Tensor, Tensor, Tensor]:
    """Atomic numbers (k+2,) and the positions (k+2, 3) of the two chains, in Å.

    Geometry as in Joshi et al. scaled so that neighbouring atoms are ``bond`` apart: backbone atoms
    at (0, i·bond, 0), terminal atoms at (±0.8, −0.6)·bond and (0.8, (k−1) + 0.6)·bond. Nearest
    non-bonded distances are 1.79·bond (terminal–backbone) and 2·bond (backbone), so a cutoff between
    bond and 1.79·bond sees bonded neighbours only.
    """
    if k < 2:
        raise ValueError(f"k-chains need k >= 2, got {k}")
    backbone = [[0.0, float(i), 0.0] for i in range(k)]
    tail = [0.8, (k - 1) + 0.6, 0.0]
    pos_a = torch.tensor([[-0.8, -0.6, 0.0]] + backbone + [tail], dtype=dtype) * bond
    pos_b = torch.tensor([[0.8, -0.6, 0.0]] + backbone + [tail], dtype=dtype) * bond
    centre = pos_a.mean(0)
    return torch.full((k + 2,), 6, dtype=torch.long), pos_a - centre, pos_b - pos_b.mean(0)


def separates(model: Callable[..., Tensor], k: int, bond: float = 1.0, rtol: float = 1e-12) -> bool:
    """True if ``model(z, pos)`` gives the two chains of the k-chain pair different energies
    (relative difference above ``rtol``; float64 round-off is ~1e-15, the signal after k hops of
    cutoff-weighted passing ~1e-10)."""
    z, pos_a, pos_b = kchain_pair(k, bond)
    with torch.no_grad():
        e_a, e_b = float(model(z, pos_a)), float(model(z, pos_b))
    return abs(e_a - e_b) > rtol * max(abs(e_a), abs(e_b), 1e-12)


def smallest_separating_iterations(make_model: Callable[[int], torch.nn.Module], k: int,
                                   max_iterations: int = 8, bond: float = 1.0) -> int:
    """Smallest T for which ``make_model(T)`` separates the k-chain pair, or -1 if none up to
    ``max_iterations``."""
    for t in range(0, max_iterations + 1):
        if separates(make_model(t), k, bond):
            return t
    return -1


def model_factory(cls, seed: int = 0, cutoff: float = 1.75, **kwargs) -> Callable[[int], torch.nn.Module]:
    """``num_iterations -> model``: float64 ``cls(cutoff=cutoff, num_iterations=T, **kwargs)`` with
    seeded random weights (including the output layers) for the separation experiments."""
    from pyg_equireann.utils import perturb_parameters

    def make(num_iterations: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return perturb_parameters(cls(cutoff=cutoff, num_iterations=num_iterations, **kwargs).double(), seed)

    return make


def separation_table(make_models: Dict[str, Callable[[int], torch.nn.Module]], ks=range(2, 9),
                     max_iterations: int = 8) -> str:
    """Markdown table of the smallest separating iteration count per model and k."""
    lines = ["| k | ⌊k/2⌋+1 | " + " | ".join(make_models) + " |", "|---|---|" + "---|" * len(make_models)]
    for k in ks:
        cells = []
        for make_model in make_models.values():
            t = smallest_separating_iterations(make_model, k, max_iterations)
            cells.append(str(t) if t >= 0 else f"> {max_iterations}")
        lines.append(f"| {k} | {k // 2 + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
