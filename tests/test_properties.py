"""Property-based robustness sweep (hypothesis) over random small structures: random elements,
positions and cells (skewed, smaller than the cutoff, periodic in some or all directions, or none).
For every structure: finite energy, forces and stress; O(3), translation and permutation invariance
in float32; forces = -dE/dx and stress = dE/dε / V against central finite differences in float64.

Examples are drawn deterministically (``derandomize=True``, no example database), so CI sees the
same structures on every run; ``max_examples`` is kept small to bound the run time.
"""
import functools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyg_equireann import REANN, EquiREANN, energy_forces_stress
from pyg_equireann.graph.checks import cell_density_message

from .conftest import make_model, random_rotation

ELEMENTS = [1, 6, 8, 29]
SWEEP = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@functools.lru_cache(maxsize=None)
def model(name: str):
    """Random (non-zero last layer) float64 models, built once; cutoff 3 Å."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if name == "equireann":
            m = make_model(EquiREANN, cutoff=3.0, elements=ELEMENTS, num_channels=8, num_iterations=2,
                           avg_num_neighbors=12.0)
        else:
            m = make_model(REANN, cutoff=3.0, elements=ELEMENTS, num_channels=8, num_radial=4, max_l=2,
                           message_hidden=(16,), readout_hidden=(16,), avg_num_neighbors=12.0)
    finally:
        torch.set_default_dtype(previous)
    m.set_energy_statistics(scale=0.7, shift=0.2)
    return m.eval()


@st.composite
def structures(draw):
    """(z (N,), pos (N, 3), cell (3, 3) or None, pbc (3,) or None) with atoms at least 0.5 Å apart."""
    n = draw(st.integers(1, 5))
    z = torch.tensor(draw(st.lists(st.sampled_from(ELEMENTS), min_size=n, max_size=n)))
    periodic = draw(st.booleans())
    if periodic:
        # lower-triangular rows: lengths 0.9-4.5 Å (many below the 3 Å cutoff), skewed by up to half a row
        diag = draw(st.lists(st.floats(0.9, 4.5), min_size=3, max_size=3))
        off = draw(st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3))
        cell = torch.tensor([[diag[0], 0.0, 0.0], [off[0] * diag[1], diag[1], 0.0],
                             [off[1] * diag[2], off[2] * diag[2], diag[2]]])
        pbc = torch.tensor(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
        assume(bool(pbc.any()))
        frac = torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=3 * n, max_size=3 * n))).view(n, 3)
        pos = frac @ cell
        # denser than any matter (e.g. one atom in 0.9^3 Å^3) is refused by the model: see test_geometry_checks
        assume(not cell_density_message(torch.tensor([n]), cell[None], pbc[None], 3.0))
    else:
        cell = pbc = None
        span = draw(st.floats(1.5, 6.0))
        pos = span * torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=3 * n, max_size=3 * n))).view(n, 3)
    # reject structures with atoms (or periodic images) closer than 0.5 Å
    edge_index, offsets = model("equireann").build_graph(pos, None, cell, pbc)
    vectors = pos[edge_index[0]] - pos[edge_index[1]]
    if offsets is not None:
        vectors = vectors + offsets @ cell
    assume(vectors.numel() == 0 or float(vectors.norm(dim=1).min()) >= 0.5)
    assume(edge_index.shape[1] <= 3000)  # tiny skewed cells: bound the neighbour count
    return z, pos, cell, pbc


def evaluate(m, z, pos, cell, pbc, stress=False):
    return energy_forces_stress(m, z, pos, None, cell, pbc, compute_stress=stress and cell is not None)


@pytest.mark.parametrize("name", ["equireann", "reann"])
@SWEEP
@given(structure=structures(), seed=st.integers(0, 1000))
def test_finite_and_invariant_in_float32(name, structure, seed):
    """Finite outputs; E(Rx + t) = E(x) for a random rotation or reflection R and translation t, and
    E of permuted atoms = E, in float32 to 1e-5 relative (to Σ|atomic energy|); forces rotate with R (1e-5 of the largest force)."""
    z, pos, cell, pbc = structure
    m64 = model(name)
    out = evaluate(m64, z, pos, cell, pbc, stress=True)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    if "stress" in out:
        assert torch.isfinite(out["stress"]).all()

    m32 = _float32(name)
    R = random_rotation(seed, reflect=seed % 2 == 1)
    t = torch.randn(3, generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    base = evaluate(m32, z, pos.float(), None if cell is None else cell.float(), pbc)
    atomic = m32.compute(z, pos.float(), None, None if cell is None else cell.float(), pbc)["atomic_energies"]
    norm = float(atomic.detach().abs().sum()) + 1e-6
    moved_cell = None if cell is None else (cell @ R.T).float()
    moved = evaluate(m32, z, (pos @ R.T + t).float(), moved_cell, pbc)
    permuted = evaluate(m32, z[perm], pos[perm].float(), None if cell is None else cell.float(), pbc)
    assert abs(float(moved["energy"] - base["energy"])) <= 1e-5 * norm
    assert abs(float(permuted["energy"] - base["energy"])) <= 1e-5 * norm
    scale = float(base["forces"].abs().max()) + 1e-3
    torch.testing.assert_close(moved["forces"], base["forces"] @ R.T.float(), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(permuted["forces"], base["forces"][perm], rtol=0, atol=1e-5 * scale)


@functools.lru_cache(maxsize=None)
def _float32(name: str):
    import copy

    return copy.deepcopy(model(name)).float()


@pytest.mark.parametrize("name", ["equireann", "reann"])
@settings(SWEEP, max_examples=20)
@given(structure=structures())
def test_forces_and_stress_are_energy_derivatives(name, structure):
    """Autograd forces and stress equal central finite differences of the energy (float64, h = 1e-5 Å
    and 1e-5 strain)."""
    z, pos, cell, pbc = structure
    m = model(name)
    out = evaluate(m, z, pos, cell, pbc, stress=True)
    h = 1e-5

    def energy(p, c=cell):
        with torch.no_grad():
            return float(m(z, p, None, c, pbc))

    fd = torch.zeros_like(pos)
    for i in range(pos.shape[0]):
        for k in range(3):
            step = torch.zeros_like(pos)
            step[i, k] = h
            fd[i, k] = -(energy(pos + step) - energy(pos - step)) / (2 * h)
    scale = float(fd.abs().max()) + 1e-2
    torch.testing.assert_close(out["forces"], fd, rtol=0, atol=1e-6 * scale)
    if "stress" in out:
        volume = float(torch.linalg.det(cell).abs())
        fd_stress = torch.zeros(3, 3)
        for a in range(3):
            for b in range(a, 3):
                strain = torch.zeros(3, 3)
                strain[a, b] = strain[b, a] = h / 2 if a != b else h
                plus, minus = torch.eye(3) + strain, torch.eye(3) - strain
                value = (energy(pos @ plus, cell @ plus) - energy(pos @ minus, cell @ minus)) / (2 * h)
                # off-diagonal: h/2 in (a, b) and (b, a) changes E by V·σ_ab·h, as h in (a, a) does
                fd_stress[a, b] = fd_stress[b, a] = value / volume
        scale = float(fd_stress.abs().max()) + 1e-2
        torch.testing.assert_close(out["stress"][0], fd_stress, rtol=0, atol=1e-6 * scale)
