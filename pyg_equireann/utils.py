"""Small helpers shared by tests, benchmarks and examples."""
import torch
from torch import nn


def perturb_parameters(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Add seeded Gaussian noise to every parameter (std scale/√fan-in for matrices, 0.1·scale for
    vectors), so that zero-initialised output layers become non-zero. Physics tests need this:
    zero last layers make outputs constant and hide bugs. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(scale * noise / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.1 * scale * noise)
    return model
