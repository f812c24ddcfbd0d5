"""The density invariants of EquiREANN's orbital contraction (``density_invariants``: the paper's squared norm,
one norm per degree, and the four-body Gaunt triple products), float64. About 1 s."""
import pytest
import torch
from torch_geometric.data import Batch, Data

from pyg_equireann import EquiREANN, spherical_harmonics
from pyg_equireann.nn.conv import OrbitalContraction, gaunt_paths
from pyg_equireann.nn.orbitals import spherical_degrees

from .conftest import load_rmd17, make_model, random_rotation


def random_orbital(max_l, points, num_radial=4, seed=0):
    """Ψ (1, A, K) = Σ_j w_jk Y_a(r_j) of a few random neighbours r_j, and the same for rotated copies."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(points), num_radial, generator=g, dtype=torch.float64)
    return torch.einsum("ja,jk->ak", spherical_harmonics(points, max_l), weights).unsqueeze(0)


@pytest.mark.parametrize("max_l", [2, 3])
@pytest.mark.parametrize("reflect", [False, True])
def test_density_invariants_are_o3_invariant(max_l, reflect):
    torch.manual_seed(0)
    contraction = OrbitalContraction(spherical_degrees(max_l), 4, 6, "cubic").double()
    points = torch.randn(7, 3, dtype=torch.float64)
    R = random_rotation(3, reflect=reflect)
    density = contraction(random_orbital(max_l, points))
    rotated = contraction(random_orbital(max_l, points @ R.T))
    groups = max_l + 1 + len(gaunt_paths(max_l))
    assert density.shape == (1, groups * 6)
    assert torch.allclose(rotated, density, rtol=1e-10, atol=1e-14)
    cubic = density.view(groups, 6)[max_l + 1:]
    assert cubic.abs().min() > 1e-8  # every Gaunt path contributes


def test_gaunt_paths_are_the_even_couplings_beyond_products_of_norms():
    assert [p for p, _ in gaunt_paths(2)] == [(1, 1, 2), (2, 2, 2)]
    assert [p for p, _ in gaunt_paths(3)] == [(1, 1, 2), (1, 2, 3), (2, 2, 2), (2, 3, 3)]
    assert gaunt_paths(1) == []
    # ∫ Y_{1,0} Y_{1,0} Y_{2,0} dΩ = √(3·3·5/4π) (1 1 2; 0 0 0)² = 1/√(5π)
    (_, gaunt), _ = gaunt_paths(2)
    assert gaunt[1, 1, 2].item() == pytest.approx(1.0 / (5.0 * torch.pi) ** 0.5, rel=1e-12)


def test_per_degree_norms_sum_to_the_paper_density():
    torch.manual_seed(0)
    degrees = spherical_degrees(2)
    norm = OrbitalContraction(degrees, 4, 5, "norm").double()
    per_degree = OrbitalContraction(degrees, 4, 5, "degree").double()
    per_degree.weight.data.copy_(norm.weight.data)
    psi = random_orbital(2, torch.randn(6, 3, dtype=torch.float64))
    weight = torch.rand(1, 5, dtype=torch.float64)
    assert torch.allclose(per_degree(psi, weight).view(3, 5).sum(0), norm(psi, weight).view(5), rtol=1e-12)


def test_density_scale_per_invariant_group():
    """With several invariant groups the calibration gives each group of every iteration unit RMS (their
    magnitudes differ: cubic terms scale as Ψ³, norms as Ψ²); the paper's model keeps one scale per iteration."""
    z, coords, _, _ = load_rmd17("aspirin", slice(0, 4))
    model = make_model(EquiREANN, num_iterations=2, density_invariants="cubic", mlp_activation="silu")
    assert model.density_scale.shape == (3, 5)
    batch = Batch.from_data_list([Data(z=z, pos=c) for c in coords])
    model.calibrate_density_scale([batch])
    densities = model.compute(batch.z, batch.pos, batch.batch)["densities"]
    for density in densities:
        rms = density.view(len(z) * 4, 5, -1).square().mean((0, 2)).sqrt()
        assert torch.allclose(rms, torch.ones(5, dtype=torch.float64), rtol=1e-8)
    assert EquiREANN(num_iterations=2).density_scale.shape == (3,)


def test_cubic_needs_spherical_harmonics_and_names_are_checked():
    with pytest.raises(ValueError, match="cubic.*needs angular='spherical'"):
        EquiREANN(density_invariants="cubic", angular="cartesian")
    with pytest.raises(ValueError, match="invariants must be one of"):
        EquiREANN(density_invariants="quartic")
    with pytest.raises(ValueError, match="activation must be one of"):
        EquiREANN(mlp_activation="relu")
