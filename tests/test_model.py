"""Physics of EquiREANN and REANN (spec §8), float64 with random weights and non-zero last layers."""
import math

import pytest
import torch

from pyg_equireann import EquiREANN, REANN, energy_forces_stress, spherical_harmonics
from pyg_equireann.graph.edges import reverse_edges

from pyg_equireann.testing import Structure, check_forces_finite_differences

from .conftest import load_rmd17, make_model, random_rotation, small_periodic_system

MODELS = {
    "equireann": lambda seed=0: make_model(EquiREANN, seed, num_iterations=3, max_l=3),
    "learned_passing": lambda seed=0: make_model(EquiREANN, seed, num_iterations=3, max_l=3, learnable_passing=True,
                                                 passing_init="alternating"),
    "multihop": lambda seed=0: make_model(EquiREANN, seed, num_iterations=2, max_l=3, learnable_passing=True,
                                          passing_init="alternating", passing_hops=3, passing_norm=True),
    "nonbacktracking": lambda seed=0: make_model(EquiREANN, seed, num_iterations=2, max_l=2, learnable_passing=True,
                                                 passing_init="alternating", passing_hops=4, passing_norm=True,
                                                 passing_norm_eps=0.02, passing_nonbacktracking=True,
                                                 passing_hop_channels=3),
    "hop_cutoff": lambda seed=0: make_model(EquiREANN, seed, num_iterations=2, max_l=2, learnable_passing=True,
                                            passing_init="alternating", passing_hops=4, passing_norm=True,
                                            passing_norm_eps=0.004, passing_nonbacktracking=True,
                                            passing_hop_channels=3, passing_hop_cutoff=2.0),
    "elastic": lambda seed=0: make_model(EquiREANN, seed, num_iterations=2, max_l=2, learnable_passing=True,
                                         passing_init="alternating", passing_hops=4, passing_norm=True,
                                         passing_norm_eps=0.004, passing_nonbacktracking=True, passing_hop_channels=3,
                                         passing_hop_cutoff=2.0, elastic_channels=2, elastic_iterations=8,
                                         elastic_terminal_anchor=0.5, elastic_learned_anchors=False),
    "elastic_per_degree": lambda seed=0: make_model(EquiREANN, seed, num_iterations=2, max_l=2, learnable_passing=True,
                                                    passing_init="alternating", passing_hops=2, passing_norm=True,
                                                    passing_hop_channels=3, elastic_channels=2,
                                                    elastic_anchor_per_degree=True, elastic_terminal_anchor=1.0),
    "passing_off": lambda seed=0: make_model(EquiREANN, seed, num_iterations=3, max_l=3, equivariant_passing=False),
    "cubic_silu": lambda seed=0: make_model(EquiREANN, seed, num_iterations=3, max_l=3, density_invariants="cubic",
                                            mlp_activation="silu"),
    "reann": lambda seed=0: make_model(REANN, seed, num_iterations=2, elements=(1, 6, 8)),
    "cartesian_passing": lambda seed=0: make_model(
        EquiREANN, seed, angular="cartesian", num_iterations=2, avg_num_neighbors=5.0
    ),
}


def aspirin(frame=0):
    z, coords, _, _ = load_rmd17("aspirin", slice(frame, frame + 1))
    return z, coords[0]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("reflect", [False, True])
def test_o3_invariance_and_force_equivariance(name, reflect):
    model = MODELS[name]()
    z, pos = aspirin()
    R = random_rotation(1, reflect=reflect)
    out = energy_forces_stress(model, z, pos)
    out_rot = energy_forces_stress(model, z, pos @ R.T)
    assert rel(out_rot["energy"], out["energy"]) < 1e-10
    assert rel(out_rot["forces"], out["forces"] @ R.T) < 1e-10
    assert out["forces"].abs().max() > 1e-3  # non-trivial forces


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("passing", [True, False])
def test_orbitals_rotate_with_wigner_matrices(reflect, passing):
    """Every l-block of Ψ⁽ᵗ⁾ transforms with D^l obtained by least squares in the package's own basis;
    densities and coefficients are invariant (spec §8.4)."""
    max_l = 4
    model = make_model(EquiREANN, max_l=max_l, num_iterations=3, equivariant_passing=passing)
    z, pos = aspirin()
    R = random_rotation(7, reflect=reflect)
    out, out_rot = model.compute(z, pos), model.compute(z, pos @ R.T)
    v = torch.nn.functional.normalize(torch.randn(60, 3), dim=-1)
    y, y_rot = spherical_harmonics(v, max_l), spherical_harmonics(v @ R.T, max_l)
    for t in range(4):
        psi, psi_rot = out["node_orbitals"][t], out_rot["node_orbitals"][t]
        assert psi.shape == (21, (max_l + 1) ** 2, 8)
        for l in range(max_l + 1):
            sl = slice(l * l, (l + 1) ** 2)
            D = torch.linalg.lstsq(y[:, sl], y_rot[:, sl]).solution.T
            assert torch.allclose(D @ D.T, torch.eye(2 * l + 1), atol=1e-10)
            expected = torch.einsum("ab,nbk->nak", D, psi[:, sl])
            assert rel(psi_rot[:, sl], expected) < 1e-10, (t, l)
        assert rel(out_rot["densities"][t], out["densities"][t]) < 1e-10
        assert rel(out_rot["edge_coefficients"][t], out["edge_coefficients"][t]) < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
def test_translation_permutation_batch(name):
    model = MODELS[name]()
    z, coords, _, _ = load_rmd17("aspirin", slice(0, 3))
    single = [energy_forces_stress(model, z, c) for c in coords]
    e0 = single[0]["energy"]
    # translation
    assert rel(model(z, coords[0] + torch.tensor([3.0, -7.0, 11.0])), e0) < 1e-12
    # permutation
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(3))
    out_perm = energy_forces_stress(model, z[perm], coords[0][perm])
    assert rel(out_perm["energy"], e0) < 1e-12
    assert rel(out_perm["forces"], single[0]["forces"][perm]) < 1e-10
    # batch vs single
    batch = torch.arange(3).repeat_interleave(len(z))
    out_batch = energy_forces_stress(model, z.repeat(3), coords.reshape(-1, 3), batch)
    assert rel(out_batch["energy"], torch.cat([s["energy"] for s in single])) < 1e-12
    assert rel(out_batch["forces"], torch.cat([s["forces"] for s in single])) < 1e-10


@pytest.mark.parametrize("name", list(MODELS))
def test_far_atom_changes_nothing(name):
    model = MODELS[name]()
    z, pos = aspirin()
    far = torch.cat([pos, pos.mean(0, keepdim=True) + torch.tensor([[50.0, 0.0, 0.0]])])
    zf = torch.cat([z, torch.tensor([8])])
    isolated = model(torch.tensor([8]), far[-1:])
    assert rel(model(zf, far), model(z, pos) + isolated) < 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_forces_match_finite_differences(name):
    z, pos = aspirin()
    measured = check_forces_finite_differences(MODELS[name](), Structure(z, pos, None, None), h=1e-5, rtol=1e-6)
    assert measured["forces"] < 1e-6


def periodic_models():
    return {
        "equireann": make_model(EquiREANN, num_iterations=2, avg_num_neighbors=4.0),
        "reann": make_model(REANN, elements=(1, 6, 8), avg_num_neighbors=4.0),
        "hop_cutoff": make_model(EquiREANN, num_iterations=2, avg_num_neighbors=4.0, learnable_passing=True,
                                 passing_init="alternating", passing_hops=4, passing_norm=True,
                                 passing_nonbacktracking=True, passing_hop_cutoff=2.5),
    }


@pytest.mark.parametrize("name", ["equireann", "reann", "hop_cutoff"])
def test_stress_matches_finite_strain(name):
    model = periodic_models()[name]
    z, pos, cell = small_periodic_system()
    out = energy_forces_stress(model, z, pos, cell=cell, compute_stress=True)
    stress = out["stress"][0]
    assert torch.allclose(stress, stress.T, atol=1e-12)
    h = 1e-5
    volume = torch.det(cell).abs()
    fd = torch.zeros(3, 3)
    with torch.no_grad():
        for a in range(3):
            for b in range(3):
                energies = []
                for sign in (1, -1):
                    eps = torch.zeros(3, 3)
                    eps[a, b] += sign * h / 2
                    eps[b, a] += sign * h / 2
                    deform = torch.eye(3) + eps
                    energies.append(model(z, pos @ deform, cell=cell @ deform))
                fd[a, b] = (energies[0] - energies[1]).item() / (2 * h) / volume
    assert rel(stress, fd) < 1e-6
    assert stress.abs().max() > 1e-4


@pytest.mark.parametrize("name", ["equireann", "reann", "hop_cutoff"])
def test_periodic_supercell_wrapping_and_rotation(name):
    model = periodic_models()[name]
    z, pos, cell = small_periodic_system()
    assert cell.norm(dim=1).min() < 2 * model.cutoff  # several images of each atom are neighbours
    if name == "hop_cutoff":  # hop edges to periodic images (told apart by their shifts in reverse_edges)
        out = model.compute(z, pos, cell=cell)
        vectors, edge_index = out["edge_vectors"].detach(), out["edge_index"]
        image = (vectors - (pos[edge_index[0]] - pos[edge_index[1]])).norm(dim=-1) > 1e-6
        assert ((vectors.norm(dim=-1) < 2.5) & image).sum() >= 4
    energy = model(z, pos, cell=cell)
    # 2×1×1 supercell: extensive
    pos2 = torch.cat([pos, pos + cell[0]])
    cell2 = cell.clone()
    cell2[0] *= 2
    assert rel(model(z.repeat(2), pos2, cell=cell2), 2 * energy) < 1e-10
    # wrapping atoms into (or out of) the cell changes nothing
    shifted = pos + torch.tensor([[1.0, 0, 0], [0, -2.0, 1.0], [3.0, 1.0, -1.0], [0, 0, 0]]) @ cell
    assert rel(model(z, shifted, cell=cell), energy) < 1e-10
    # rotating positions and cell together
    R = random_rotation(5, reflect=True)
    out = energy_forces_stress(model, z, pos, cell=cell, compute_stress=True)
    out_rot = energy_forces_stress(model, z, pos @ R.T, cell=cell @ R.T, compute_stress=True)
    assert rel(out_rot["energy"], out["energy"]) < 1e-10
    assert rel(out_rot["forces"], out["forces"] @ R.T) < 1e-10
    assert rel(out_rot["stress"][0], R @ out["stress"][0] @ R.T) < 1e-9


def test_periodic_batch_matches_single():
    model = periodic_models()["equireann"]
    z, pos, cell = small_periodic_system(0)
    z2, pos2, _ = small_periodic_system(1)
    cell2 = cell * 1.3
    pos2 = pos2 * 1.3
    e1, e2 = model(z, pos, cell=cell), model(z2, pos2, cell=cell2)
    batch = torch.tensor([0] * 4 + [1] * 4)
    both = model(torch.cat([z, z2]), torch.cat([pos, pos2]), batch, cell=torch.stack([cell, cell2]))
    assert rel(both, torch.cat([e1, e2])) < 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_smooth_at_cutoff(name):
    """E and F are continuous as an atom crosses r_c; the jump decays at least like δ⁴."""
    model = MODELS[name]()
    rc = model.cutoff
    z = torch.tensor([6, 8, 1])
    base = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [0.0, 0.0, 0.0]])

    def at(d):
        pos = base.clone()
        pos[2] = torch.tensor([-d, 0.3, 0.0])
        pos[2] = pos[2] / pos[2].norm() * d  # H at distance d from C, beyond the O's cutoff
        return energy_forces_stress(model, z, pos)

    jumps = []
    for delta in (1e-2, 1e-3):
        inside, outside = at(rc - delta), at(rc + delta)
        jumps.append((inside["energy"] - outside["energy"]).abs().item())
        assert (inside["forces"] - outside["forces"]).abs().max() < 50 * delta**3 * (1 + inside["forces"].abs().max())
    assert jumps[1] < jumps[0] * 1e-3  # ≥ 3rd order in practice (f ∝ δ⁴)
    assert jumps[1] < 1e-9


def test_smooth_at_hop_cutoff():
    """passing_hop_cutoff: E and F are smooth as an atom crosses r_hop (its hop edges leave the hops' list while it
    stays inside r_c): E(r_hop + δ) − E(r_hop − δ) is the central difference of the force (residual O(δ³), no step),
    and the force change shrinks with δ (no step in F)."""
    model = MODELS["hop_cutoff"]()
    r_hop = model.hop_cutoff_fn.cutoff
    z = torch.tensor([6, 6, 8, 1])
    base = torch.tensor([[0.0, 0.0, 0.0], [1.3, 0.0, 0.0], [2.5, 0.2, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    direction = torch.tensor([-1.0, 0.5, 0.3], dtype=torch.float64)
    direction = direction / direction.norm()

    def at(d):
        pos = base.clone()
        pos[3] = direction * d  # H at distance d from the first C, within r_c of every atom
        return energy_forces_stress(model, z, pos)

    slope = -(at(r_hop)["forces"][3] @ direction).item()  # dE/dd at r_hop
    assert abs(slope) > 1e-6
    residuals, force_steps = [], []
    for delta in (1e-2, 1e-3):
        inside, outside = at(r_hop - delta), at(r_hop + delta)
        residuals.append(abs((outside["energy"] - inside["energy"]).item() - 2 * delta * slope))
        force_steps.append((outside["forces"] - inside["forces"]).abs().max().item())
    assert residuals[1] < 1e-10 and residuals[1] < residuals[0] * 1e-2
    assert force_steps[1] < 0.2 * force_steps[0]


@pytest.mark.parametrize("nonbacktracking", [False, True])
def test_hop_cutoff_is_the_hops_on_every_edge_with_weight_f_r_hop(nonbacktracking):
    """The hops on the edges shorter than r_hop equal the hops on every edge with weight f(d; r_hop) (0 beyond
    r_hop), by hand and by the model's own full-list path (compact_hop_edges=False, its CUDA path): leaving those
    edges out changes nothing but the cost; different from hopping with f(d; r_c). Bad values are refused."""
    z, pos = aspirin()
    kw = dict(num_iterations=2, max_l=2, passing_hops=4, passing_norm=True, passing_norm_eps=0.004,
              passing_nonbacktracking=nonbacktracking, learnable_passing=True, passing_init="alternating",
              passing_hop_channels=2)
    torch.manual_seed(0)
    model = EquiREANN(passing_hop_cutoff=2.0, **kw).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = model.compute(z, pos)
    edge_index, lengths = out["edge_index"], out["edge_vectors"].norm(dim=-1)
    assert 0 < int((lengths < 2.0).sum()) < len(lengths) // 2
    # the same model's iterations by hand, the hops on the full list with f(d; 2 Å)
    every = EquiREANN(**kw).double()
    every.load_state_dict(model.state_dict())
    cutoff = every.cutoff_fn(lengths)
    vectors = out["edge_vectors"]
    species, atom_species = every.species, every.species_slot.index_select(0, z)
    coefficients, alpha, mu = every.species_embedding(species, atom_species, edge_index)
    radial = torch.exp(-(alpha * (lengths.unsqueeze(-1) - mu)).square())
    orbitals = (every.angular(vectors, lengths) * cutoff.unsqueeze(-1)).unsqueeze(-1) * radial.unsqueeze(1)
    weight = every.center_weight(species, atom_species)
    reverse = reverse_edges(edge_index, len(z)) if nonbacktracking else None
    psi, density = None, None
    for t, conv in enumerate(every.convs):
        psi, density, coefficients = conv(edge_index, orbitals, cutoff, coefficients, weight, psi, density,
                                          atom_species, every.avg_num_neighbors.reciprocal(), len(z), reverse,
                                          (edge_index, model.hop_cutoff_fn(lengths)))
        density = density / every.density_scale[t]
        assert rel(psi, out["node_orbitals"][t]) < 1e-13
    assert rel(every.compute(z, pos)["node_orbitals"][2], out["node_orbitals"][2]) > 1e-3
    # the model's own full-list path (what it takes on CUDA: no host sync), energy and forces included
    model.compact_hop_edges = False
    full = model.compute(z, pos)
    assert all(rel(a, b) < 1e-13 for a, b in zip(full["node_orbitals"], out["node_orbitals"]))
    e_full, f_full = energy_forces_stress(model, z, pos).values()
    model.compact_hop_edges = None
    e_short, f_short = energy_forces_stress(model, z, pos).values()
    assert rel(e_full, e_short) < 1e-13 and rel(f_full, f_short) < 1e-12
    with pytest.raises(ValueError, match=r"passing_hop_cutoff must be in \(0, cutoff=4.0\] Å, got 5.0"):
        EquiREANN(passing_hops=3, passing_hop_cutoff=5.0)
    with pytest.raises(ValueError, match="passing_hop_cutoff needs passing_hops >= 2"):
        EquiREANN(passing_hop_cutoff=2.0)


def dihedral_chain(phi_deg: float) -> torch.Tensor:
    """A–B–C–D with 1.0 Å bonds, both bond angles 120°, dihedral φ (spec §8.10)."""
    phi = math.radians(phi_deg)
    theta = math.radians(120.0)
    b = torch.tensor([0.0, 0.0, 0.0])
    c = torch.tensor([1.0, 0.0, 0.0])
    a = b + torch.tensor([-math.cos(math.pi - theta), math.sin(math.pi - theta), 0.0])
    d = c + torch.tensor([math.cos(math.pi - theta), math.sin(math.pi - theta) * math.cos(phi),
                          math.sin(math.pi - theta) * math.sin(phi)])
    return torch.stack([a, b, c, d])


def test_dihedral_chain_geometry():
    pos = dihedral_chain(37.0)
    d = torch.cdist(pos, pos)
    assert torch.allclose(torch.diagonal(d, 1), torch.ones(3))
    assert d[0, 2] == pytest.approx(math.sqrt(3)) and d[1, 3] == pytest.approx(math.sqrt(3))
    assert d[0, 3] >= 2.0 - 1e-12


@pytest.mark.parametrize("T", [1, 2, 3])
def test_dihedral_invisible_to_invariant_messages(T):
    z = torch.tensor([6, 6, 6, 6])
    angles = [0.0, 30.0, 60.0, 90.0, 150.0, 180.0]
    for model in (
        make_model(EquiREANN, cutoff=1.7, num_iterations=T, equivariant_passing=False),
        make_model(EquiREANN, cutoff=1.7, num_iterations=T, equivariant_passing=False, density_invariants="cubic"),
        make_model(REANN, cutoff=1.7, num_iterations=T, elements=(6,)),
    ):
        energies = torch.stack([model(z, dihedral_chain(p)) for p in angles])
        assert (energies - energies[0]).abs().max() < 1e-12


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("invariants", ["norm", "cubic"])
def test_dihedral_visible_to_equivariant_passing(T, invariants):
    z = torch.tensor([6, 6, 6, 6])
    model = make_model(EquiREANN, cutoff=1.7, num_iterations=T, density_invariants=invariants)
    energies = {p: model(z, dihedral_chain(p)).item() for p in (-60.0, 0.0, 60.0, 120.0, 180.0)}
    assert abs(energies[60.0] - energies[0.0]) > 1e-8
    assert abs(energies[120.0] - energies[60.0]) > 1e-8
    assert energies[60.0] == pytest.approx(energies[-60.0], abs=1e-12)


def test_passing_has_no_parameters():
    torch.manual_seed(0)
    on = EquiREANN(equivariant_passing=True)
    torch.manual_seed(0)
    off = EquiREANN(equivariant_passing=False)
    assert sum(p.numel() for p in on.parameters()) == sum(p.numel() for p in off.parameters())
    for (n1, p1), (n2, p2) in zip(on.state_dict().items(), off.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_learned_passing_weights():
    """λ = 1 reproduces the paper's model with the same seed (T·(L+1)·K extra parameters); λ multiplies
    the passed orbital per degree and radial channel: with λ = −1 the passed part changes sign, so Ψ⁽¹⁾
    equals the local part minus the passed one."""
    z, pos = aspirin()
    torch.manual_seed(0)
    paper = EquiREANN(num_iterations=2, max_l=3).double()
    torch.manual_seed(0)
    learned = EquiREANN(num_iterations=2, max_l=3, learnable_passing=True).double()
    extra = sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in paper.parameters())
    assert extra == 2 * 4 * 8
    assert learned(z, pos).item() == pytest.approx(paper(z, pos).item(), rel=1e-13)
    alternating = EquiREANN(num_iterations=1, learnable_passing=True, passing_init="alternating", passing_gain=2.0)
    assert alternating.convs[1].passing_weight[0].tolist() == [2.0, -2.0] * 4
    with pytest.raises(ValueError, match="passing_init"):
        EquiREANN(learnable_passing=True, passing_init="random")
    with pytest.raises(ValueError, match="needs equivariant_passing"):
        EquiREANN(learnable_passing=True, equivariant_passing=False)

    model = make_model(EquiREANN, num_iterations=1, learnable_passing=True)
    psi = {}
    for value in (1.0, 0.0, -1.0):
        with torch.no_grad():
            model.convs[1].passing_weight.fill_(value)
        psi[value] = model.compute(z, pos)["node_orbitals"][1]
    assert rel(psi[-1.0], 2 * psi[0.0] - psi[1.0]) < 1e-12
    assert rel(psi[1.0], psi[0.0]) > 1e-2


def test_multihop_passing_is_a_truncated_neumann_series():
    """passing_hops = 3: Ψ⁽¹⁾ = Ψ₀ + μ₂ W (Ψ₀ + μ₁ W Ψ₀) with W_ij = f_ij / (ε + Σ_k f_ik) (dense re-implementation)
    and Ψ₀ the one-hop Ψ⁽¹⁾; iteration 0 does not hop; μ = 0 gives back the one-hop model; invalid settings are
    refused."""
    z, pos = aspirin()
    torch.manual_seed(0)
    one = EquiREANN(num_iterations=1, max_l=2, passing_norm=True).double()
    torch.manual_seed(0)
    three = EquiREANN(num_iterations=1, max_l=2, passing_hops=3, passing_norm=True).double()
    assert sum(p.numel() for p in three.parameters()) - sum(p.numel() for p in one.parameters()) == 2 * 3 * 8
    assert three.convs[0].hop_gain is None
    with torch.no_grad():
        for p in three.parameters():  # non-zero message and readout networks
            p.add_(0.1 * torch.randn_like(p))
        one.load_state_dict({k: v for k, v in three.state_dict().items() if "hop_gain" not in k}, strict=True)
        three.convs[1].hop_gain.uniform_(-2.0, 2.0)
    out1, out3 = one.compute(z, pos), three.compute(z, pos)
    assert rel(out3["node_orbitals"][0], out1["node_orbitals"][0]) == 0.0
    edge_index, f = out1["edge_index"], one.cutoff_fn(out1["edge_vectors"].norm(dim=-1))
    dense = torch.zeros(len(z), len(z), dtype=torch.float64)
    dense.index_put_((edge_index[1], edge_index[0]), f, accumulate=True)
    weight = dense / (0.1 + dense.sum(1, keepdim=True))
    mu = three.convs[1].hop_gain.detach()[:, three.angular.degrees]  # (2, A, K)
    psi0 = out1["node_orbitals"][1]
    expected = psi0
    for p in range(2):
        expected = psi0 + mu[p] * torch.einsum("ij,jak->iak", weight, expected)
    assert rel(out3["node_orbitals"][1], expected) < 1e-12
    assert rel(out3["node_orbitals"][1], psi0) > 1e-2

    torch.manual_seed(0)
    plain = EquiREANN(num_iterations=2, max_l=2, passing_hops=2).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
        paper = EquiREANN(num_iterations=2, max_l=2).double()
        paper.load_state_dict({k: v for k, v in plain.state_dict().items() if "hop_gain" not in k})
        for conv in plain.convs[1:]:
            conv.hop_gain.zero_()
    assert plain(z, pos).item() == pytest.approx(paper(z, pos).item(), rel=1e-13)
    with pytest.raises(ValueError, match="passing_hops must be >= 1"):
        EquiREANN(passing_hops=0)
    with pytest.raises(ValueError, match="need equivariant_passing"):
        EquiREANN(passing_hops=2, equivariant_passing=False)


def test_nonbacktracking_hops_match_a_dense_edge_recursion():
    """passing_hops = 4, non-backtracking: h⁰_ji = Ψ₀_j,
    h^p_ji = Ψ₀_j + μ_p Σ_{k≠i} f_kj h^{p−1}_kj / (ε + Σ_{k≠i} f_kj),
    Ψ = Ψ₀ + μ₃ Σ_j W_ij h²_ji, re-implemented on dense (N, N) edge states; P = 2 is the node hop (nothing to
    backtrack), and the edge recursion needs the reverse edges."""
    z, pos = aspirin()
    eps = 0.05
    torch.manual_seed(0)
    one = EquiREANN(num_iterations=1, max_l=2, passing_norm=True, passing_norm_eps=eps).double()
    torch.manual_seed(0)
    four = EquiREANN(num_iterations=1, max_l=2, passing_hops=4, passing_norm=True, passing_norm_eps=eps,
                     passing_nonbacktracking=True).double()
    assert four.passing_nonbacktracking and four.convs[1].nonbacktracking and not four.convs[0].nonbacktracking
    with torch.no_grad():
        for p in four.parameters():
            p.add_(0.1 * torch.randn_like(p))
        one.load_state_dict({k: v for k, v in four.state_dict().items() if "hop_gain" not in k}, strict=True)
        four.convs[1].hop_gain.uniform_(-2.0, 2.0)
    out1, out4 = one.compute(z, pos), four.compute(z, pos)
    edge_index, f = out1["edge_index"], one.cutoff_fn(out1["edge_vectors"].norm(dim=-1))
    n = len(z)
    F = torch.zeros(n, n, dtype=torch.float64)  # F[j, i] = f of the edge j → i
    F.index_put_((edge_index[0], edge_index[1]), f, accumulate=True)
    total = F.sum(0)  # Σ_k f_kj per centre j
    mu = four.convs[1].hop_gain.detach()[:, four.angular.degrees]  # (3, A, K)
    psi0 = out1["node_orbitals"][1]
    edge = (F > 0).to(torch.float64)[..., None, None]  # edge states exist on edges only
    source = psi0[:, None] * edge  # h⁰[j, i] = Ψ₀_j
    state = source
    for p in range(2):
        into = torch.einsum("kj,kjab->jab", F, state)  # Σ_k f_kj h[k, j] per j
        back = F.T[..., None, None] * state.transpose(0, 1)  # [j, i]: f_ij h[i, j]
        norm = 1.0 / (eps + total[:, None] - F.T)  # [j, i]
        state = source + (into[:, None] - back) * norm[..., None, None] * mu[p] * edge
    weight = F.T / (eps + total[:, None])  # W[i, j] = f_ji / (ε + Σ_k f_ki)
    expected = psi0 + mu[2] * torch.einsum("ij,jiab->iab", weight, state)
    assert rel(out4["node_orbitals"][1], expected) < 1e-12
    torch.manual_seed(0)
    node = EquiREANN(num_iterations=1, max_l=2, passing_hops=4, passing_norm=True, passing_norm_eps=eps).double()
    node.load_state_dict(four.state_dict())
    assert rel(node.compute(z, pos)["node_orbitals"][1], expected) > 1e-2
    two = EquiREANN(num_iterations=1, max_l=2, passing_hops=2, passing_norm=True, passing_nonbacktracking=True)
    assert not two.passing_nonbacktracking and not two.convs[1].nonbacktracking
    with pytest.raises(ValueError, match="non-backtracking hops need reverse_edge"):
        four.convs[1](edge_index, torch.zeros(len(f), 9, 8, dtype=torch.float64), f, torch.zeros(len(f), 8,
                      dtype=torch.float64), node_orbitals=psi0, node_density=out1["densities"][0], num_nodes=n)


@pytest.mark.parametrize("nonbacktracking", [False, True])
def test_hops_on_the_first_radial_channels_only(nonbacktracking):
    """passing_hop_channels = K': the first K' channels hop exactly as with all K (hops act channel by channel), the
    others keep the one-hop orbital Ψ₀; the gains have K' channels; K' outside 1..K is refused."""
    z, pos = aspirin()
    kw = dict(num_iterations=1, max_l=2, passing_hops=4, passing_norm=True, passing_nonbacktracking=nonbacktracking,
              learnable_passing=True, passing_init="alternating")
    torch.manual_seed(0)
    full = EquiREANN(**kw).double()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.1 * torch.randn_like(p))
    part = EquiREANN(passing_hop_channels=3, **kw).double()
    one = EquiREANN(**{**kw, "passing_hops": 1}).double()
    state = full.state_dict()
    part.load_state_dict({k: v[..., :3] if "hop_gain" in k else v for k, v in state.items()})
    one.load_state_dict({k: v for k, v in state.items() if "hop_gain" not in k})
    assert part.convs[1].hop_gain.shape == (3, 3, 3)
    psi_full, psi_part, psi_one = (m.compute(z, pos)["node_orbitals"][1] for m in (full, part, one))
    assert rel(psi_part[..., :3], psi_full[..., :3]) < 1e-13
    assert torch.equal(psi_part[..., 3:], psi_one[..., 3:])
    assert rel(psi_full[..., 3:], psi_one[..., 3:]) > 1e-2
    with pytest.raises(ValueError, match="passing_hop_channels must be in 1..num_radial=8, got 9"):
        EquiREANN(passing_hops=2, passing_hop_channels=9)


@pytest.mark.parametrize("nonbacktracking", [False, True])
def test_tied_hop_gain_is_one_gain_for_every_hop(nonbacktracking):
    """passing_hop_tied_gain: one μ (1, L+1, K') per iteration; the same energy and forces as per-hop gains that are
    all equal to it, and different ones once a hop's own gain moves."""
    z, pos = aspirin()
    kw = dict(num_iterations=2, max_l=2, passing_hops=4, passing_norm=True, passing_norm_eps=0.004,
              passing_nonbacktracking=nonbacktracking, passing_hop_channels=3, passing_hop_cutoff=2.0,
              learnable_passing=True, passing_init="alternating")
    torch.manual_seed(0)
    tied = EquiREANN(passing_hop_tied_gain=True, **kw).double()
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.1 * torch.randn_like(p))
    per_hop = EquiREANN(**kw).double()
    per_hop.load_state_dict({k: v.expand(3, -1, -1) if "hop_gain" in k else v for k, v in tied.state_dict().items()})
    assert tied.convs[1].hop_gain.shape == (1, 3, 3) and per_hop.convs[1].hop_gain.shape == (3, 3, 3)
    e_tied, f_tied = energy_forces_stress(tied, z, pos).values()
    e_hop, f_hop = energy_forces_stress(per_hop, z, pos).values()
    assert rel(e_tied, e_hop) < 1e-13 and rel(f_tied, f_hop) < 1e-12
    with torch.no_grad():
        per_hop.convs[1].hop_gain[1].add_(0.5)
    assert rel(energy_forces_stress(per_hop, z, pos)["forces"], f_tied) > 1e-3


def test_nonbacktracking_hops_carry_an_orientation_along_a_chain_undamped():
    """A source at the end of a straight chain (nearest neighbours only): node hops spread it both ways (an echo at
    the source, ~0.5 per bond); non-backtracking hops hand it on with f/(ε + f) ≈ 1 per bond, nothing comes back."""
    from pyg_equireann.graph import radius_graph, reverse_edges
    from pyg_equireann.nn.conv import EquiREANNConv, OrbitalContraction
    from pyg_equireann.nn.orbitals import CosineCutoff

    n, cutoff, eps, hops = 8, 1.5, 1e-3, 5
    pos = torch.zeros(n, 3, dtype=torch.float64)
    pos[:, 0] = torch.arange(n, dtype=torch.float64)
    edge_index = radius_graph(pos, cutoff)
    f = CosineCutoff(cutoff)((pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=-1))
    w = f / (eps + torch.zeros(n, dtype=torch.float64).index_add(0, edge_index[1], f))[edge_index[1]]
    psi0 = torch.zeros(n, 1, 1, dtype=torch.float64)
    psi0[0] = 1.0
    degrees = torch.tensor([0])
    out = {}
    for nb in (False, True):
        conv = EquiREANNConv(OrbitalContraction(degrees, 1, 1), torch.nn.Identity(), degrees=degrees, num_radial=1,
                             passing_hops=hops, passing_norm=True, passing_norm_eps=eps,
                             passing_nonbacktracking=nb).double()
        with torch.no_grad():
            conv.hop_gain.fill_(1.0)
            if nb:
                reverse, found = reverse_edges(edge_index, n)
                scale = 1.0 / (eps + torch.zeros(n, dtype=torch.float64).index_add(0, edge_index[1], f))
                out[nb] = conv.nonbacktracking_hops(psi0, edge_index, f, scale.view(n, 1, 1), reverse, found, n)
                out[nb] = out[nb].view(-1)
            else:
                out[nb] = conv.hops(psi0, edge_index, w).view(-1)
    bond = float(f[0])
    r, half = bond / (eps + bond), bond / (eps + 2 * bond)  # hop along the chain; final hop into an inner atom
    expected = torch.tensor([1.0] + [half * r ** (d - 1) for d in range(1, hops)] + [0.0] * (n - hops),
                            dtype=torch.float64)
    assert torch.allclose(out[True], expected, rtol=1e-12, atol=0)
    assert out[False][0] > 1.5 and out[False][hops - 1] < 0.1 < 0.45 < out[True][hops - 1]


def reference_forward(model: EquiREANN, z, pos, passing: bool):
    """Independent dense re-implementation of spec §1.10 from the model's own parameters."""
    n = len(z)
    rc = model.cutoff
    rvec = pos[None, :, :] - pos[:, None, :]  # [i, j] = x_j - x_i
    d = rvec.norm(dim=-1)
    mask = (d <= rc) & ~torch.eye(n, dtype=torch.bool)
    fc = torch.where(mask, (0.5 * torch.cos(math.pi * d / rc) + 0.5) ** 2, torch.zeros_like(d))
    safe = torch.where(mask[..., None], rvec, torch.ones_like(rvec))
    Y = spherical_harmonics(safe / safe.norm(dim=-1, keepdim=True), model.max_l)  # (n, n, A)
    K = model.num_radial
    species = torch.unique(z)
    idx = torch.searchsorted(species, z)
    table = model.species_embedding.mlp(
        torch.cat([torch.nn.functional.one_hot(species, 119)[:, None].expand(-1, len(species), -1),
                   torch.nn.functional.one_hot(species, 119)[None].expand(len(species), -1, -1)], -1).double()
    )
    g = table[idx[:, None], idx[None, :]]  # (n, n, 3K) [centre, neighbour]
    c, alpha, mu = g[..., :K], g[..., K:2 * K], g[..., 2 * K:]
    R = torch.exp(-(alpha * (d[..., None] - mu)) ** 2)
    O = fc[..., None, None] * Y[..., :, None] * R[..., None, :]  # (n, n, A, K)
    w = model.center_weight.mlp(torch.nn.functional.one_hot(z, 119).double())
    inv = 1.0 / float(model.avg_num_neighbors)

    def density(psi, t):
        W = model.convs[t].contraction.weight[model.angular.degrees]  # (A, K, C)
        P = torch.einsum("nak,akc->nac", psi, W)
        return w * (P**2).sum(1)

    psi = inv * torch.einsum("ijk,ijak->iak", c, O)
    rho = density(psi, 0)
    for t in range(1, model.num_iterations + 1):
        c = c + model.convs[t].message_mlp(rho)[None, :, :]
        msg = c[..., None, :] * O
        if passing:
            msg = msg + fc[..., None, None] * psi[None, :, :, :]
        psi = inv * msg.sum(1)
        rho = density(psi, t)
    eps = model.readout(rho).squeeze(-1)
    return (model.atomic_energies[z] + model.energy_scale * eps + model.energy_shift).sum()


@pytest.mark.parametrize("passing", [True, False])
def test_matches_dense_reference(passing):
    """The MessagePassing implementation equals a dense hand-written loop (spec §8.11)."""
    model = make_model(EquiREANN, num_iterations=3, equivariant_passing=passing, avg_num_neighbors=7.0)
    model.set_energy_statistics({1: -13.6, 6: -1030.0, 8: -2040.0}, scale=0.7, shift=0.1)
    z, pos = aspirin()
    assert rel(model(z, pos), reference_forward(model, z, pos, passing).view(1)) < 1e-12


def test_energy_statistics_and_isolated_atoms():
    model = make_model(EquiREANN)
    model.set_energy_statistics({1: -13.6, 8: -2040.0}, scale=2.0, shift=0.0)
    e_h = model(torch.tensor([1]), torch.zeros(1, 3))
    e_o = model(torch.tensor([8]), torch.zeros(1, 3))
    readout = model.readout(torch.zeros(1, model.num_channels)).item()
    assert e_h.item() == pytest.approx(-13.6 + 2.0 * readout)
    assert e_o.item() == pytest.approx(-2040.0 + 2.0 * readout)


def test_elements_and_input_errors():
    model = EquiREANN(elements=[1, 6, 8])
    with pytest.raises(ValueError, match="atom 1 is element N"):
        model(torch.tensor([1, 7]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="atomic number 0"):
        model(torch.tensor([1, 0]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 6]), torch.randn(2, 2))
    with pytest.raises(ValueError, match="elements"):
        EquiREANN(per_element_readout=True)


@pytest.mark.parametrize("max_l", [0, 1, 6])
def test_any_max_l(max_l):
    model = make_model(EquiREANN, max_l=max_l, num_iterations=1)
    z, pos = aspirin()
    R = random_rotation(2)
    assert rel(model(z, pos @ R.T), model(z, pos)) < 1e-10


def test_capabilities_and_referenced_model():
    """One capability protocol (models.base.Potential): EquiREANN/REANN have every capability, an
    adapted PyG model none; known_elements has one meaning (the elements forward accepts)."""
    from torch_geometric.nn.models import SchNet

    from pyg_equireann.deploy.export import ForceField
    from pyg_equireann.models import Potential, ReferencedModel
    from pyg_equireann.models.pyg import RadiusInteractionGraph

    for cls in (EquiREANN, REANN):
        model = make_model(cls, elements=(1, 6, 8))
        assert isinstance(model, Potential) and "avg_num_neighbors" in model.state_dict()
        assert model.caches_graph and model.supports_pbc and model.calibrates_densities and model.deployable
        assert model.known_elements() == [1, 6, 8]
    schnet = ReferencedModel(SchNet(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=8,
                                    cutoff=3.0, interaction_graph=RadiusInteractionGraph(3.0))).double()
    assert not (schnet.caches_graph or schnet.supports_pbc or schnet.calibrates_densities or schnet.deployable)
    assert schnet.known_elements() is None
    schnet.set_energy_statistics({1: -13.6, 8: -2040.0})
    assert schnet.known_elements() == [1, 8]
    # checkpoints written while the energy reference held avg_num_neighbors still load
    schnet.load_state_dict(dict(schnet.state_dict(), avg_num_neighbors=torch.tensor(1.0)))
    with pytest.raises(ValueError, match="only EquiREANN-family models can be deployed"):
        ForceField(schnet)
    z = torch.tensor([8, 1, 1])
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="SchNet does not support periodic cells"):
        schnet(z, pos, cell=torch.eye(3, dtype=torch.float64) * 5.0)
