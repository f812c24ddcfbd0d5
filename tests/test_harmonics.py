import math

import numpy as np
import pytest
import torch

from pyg_equireann import AngularBasis, CosineCutoff, cartesian_powers, spherical_harmonics
from pyg_equireann.nn.orbitals import cartesian_degrees, spherical_degrees

from .conftest import random_rotation

REFERENCE = [  # spec §1.4, u = (0.48, 0.60, 0.64)
    0.2820947918,
    -0.2931615071, 0.3127056076, -0.2345292057,
    0.3146539480, -0.4195385973, 0.0721615901, -0.3356308779, -0.0707971383,
    -0.1172534622, 0.5327975011, -0.2873903987, -0.2273688759, -0.2299123190, -0.1198794377, 0.2406244963,
]


def test_reference_values():
    u = torch.tensor([[0.48, 0.60, 0.64]])
    y = spherical_harmonics(u, 3)[0]
    assert torch.allclose(y, torch.tensor(REFERENCE), atol=5e-10)


def test_explicit_low_orders():
    v = torch.nn.functional.normalize(torch.randn(50, 3), dim=-1)
    x, y, z = v.unbind(-1)
    c1 = math.sqrt(3 / (4 * math.pi))
    c2 = math.sqrt(15 / (4 * math.pi))
    expected = torch.stack([
        torch.full_like(x, 1 / math.sqrt(4 * math.pi)),
        -c1 * y, c1 * z, -c1 * x,
        c2 * x * y, -c2 * y * z, math.sqrt(5 / (16 * math.pi)) * (3 * z * z - 1), -c2 * x * z,
        math.sqrt(15 / (16 * math.pi)) * (x * x - y * y),
    ], dim=-1)
    assert torch.allclose(spherical_harmonics(v, 2), expected, atol=1e-13)


@pytest.mark.parametrize("max_l", [0, 1, 2, 4, 6, 8])
def test_orthonormal_by_quadrature(max_l):
    # Gauss–Legendre in cos θ × uniform φ integrates polynomials of degree ≤ 2L exactly.
    n = max_l + 2
    ct, wt = np.polynomial.legendre.leggauss(n)
    nphi = 2 * max_l + 2
    phi = 2 * np.pi * np.arange(nphi) / nphi
    ct_, phi_ = np.meshgrid(ct, phi, indexing="ij")
    st = np.sqrt(1 - ct_**2)
    v = torch.as_tensor(np.stack([st * np.cos(phi_), st * np.sin(phi_), ct_], -1).reshape(-1, 3))
    w = torch.as_tensor((wt[:, None] * np.full(nphi, 2 * np.pi / nphi)[None, :]).reshape(-1))
    y = spherical_harmonics(v, max_l)
    gram = y.T @ (w[:, None] * y)
    assert y.shape[1] == (max_l + 1) ** 2
    assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-12)


def test_matches_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    v = torch.nn.functional.normalize(torch.randn(20, 3), dim=-1)
    theta = torch.arccos(v[:, 2]).numpy()
    phi = torch.atan2(v[:, 1], v[:, 0]).numpy()
    y = spherical_harmonics(v, 6).numpy()
    for l in range(7):
        for m in range(-l, l + 1):
            if hasattr(scipy_special, "sph_harm_y"):
                c = scipy_special.sph_harm_y(l, abs(m), theta, phi)
            else:
                c = scipy_special.sph_harm(abs(m), l, phi, theta)
            ref = c.real if m == 0 else math.sqrt(2) * (c.real if m > 0 else c.imag)
            np.testing.assert_allclose(y[:, l * l + l + m], ref, atol=1e-12)


def test_solid_harmonics_for_non_unit_vectors():
    v = torch.randn(10, 3)
    r = v.norm(dim=-1, keepdim=True)
    y_unit = spherical_harmonics(v / r, 4)
    degrees = spherical_degrees(4)
    assert torch.allclose(spherical_harmonics(v, 4), y_unit * r ** degrees, atol=1e-12)


@pytest.mark.parametrize("max_l", [1, 2, 3, 6])
def test_rotation_is_block_orthogonal(max_l):
    """Y_l(R v) = D^l Y_l(v) with orthogonal D^l: the property equivariance rests on."""
    v = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    R = random_rotation(3)
    y, y_rot = spherical_harmonics(v, max_l), spherical_harmonics(v @ R.T, max_l)
    for l in range(max_l + 1):
        sl = slice(l * l, (l + 1) ** 2)
        D = torch.linalg.lstsq(y[:, sl], y_rot[:, sl]).solution.T
        assert torch.allclose(y_rot[:, sl], y[:, sl] @ D.T, atol=1e-10)
        assert torch.allclose(D @ D.T, torch.eye(2 * l + 1), atol=1e-10)


def test_cartesian_powers():
    v = torch.randn(5, 3)
    out = cartesian_powers(v, 3)
    assert out.shape == (5, 1 + 3 + 9 + 27)
    assert torch.equal(cartesian_degrees(2), torch.tensor([0, 1, 1, 1] + [2] * 9))
    assert torch.allclose(out[:, 4:13].view(5, 3, 3), v[:, :, None] * v[:, None, :])
    # Σ over components of r_a^{⊗l} r_b^{⊗l} = (r_a · r_b)^l
    a, b = out[0], out[1]
    dot = v[0] @ v[1]
    assert torch.allclose((a[13:] * b[13:]).sum(), dot**3)
    basis = AngularBasis(3, "cartesian")
    assert basis.num_angular == 40
    with pytest.raises(ValueError, match="spherical"):
        AngularBasis(2, "polar")


def test_cutoff_values_and_smoothness():
    f = CosineCutoff(4.0)
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.5])
    assert torch.allclose(f(d), torch.tensor([0.7285533906, 0.25, 0.0214466094, 0.0, 0.0]), atol=1e-10)
    # f ≈ (π δ / r_c)^4 / 16 near the cutoff: fourth-order contact
    for delta in (1e-2, 1e-3):
        value = f(torch.tensor([4.0 - delta]))
        assert value.item() == pytest.approx((math.pi * delta / 4.0) ** 4 / 16, rel=1e-3)
    with pytest.raises(ValueError, match="positive"):
        CosineCutoff(0.0)
