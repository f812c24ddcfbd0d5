"""The elastic orbital energy (:class:`~pyg_equireann.nn.elastic.OrbitalElasticity`,
``EquiREANN(elastic_channels=…)``): the conjugate-gradient relaxation is the exact minimiser, graph by graph, and
along a chain it is a series of springs."""
import math
from types import SimpleNamespace

import pytest
import torch

from pyg_equireann import EquiREANN
from pyg_equireann.nn.elastic import OrbitalElasticity, terminal_index
from pyg_equireann.nn.orbitals import spherical_degrees

from .conftest import make_model, random_rotation

DEGREES = spherical_degrees(2)


def chain_bonds(n, offset=0):
    i = torch.arange(n - 1) + offset
    return torch.stack([torch.cat([i, i + 1]), torch.cat([i + 1, i])])


def dense_minimum(module, orbitals, density, bond_index, bond_weight, batch):
    """min_X J per graph and channel from a dense solve of (s L + A) X = A Ψ: (B, K); with per-degree anchors one
    solve per degree, each with its degree's anchors."""
    anchor = torch.nn.functional.softplus(module.anchor(density)) + module.min_anchor  # (N, K) or (N, (L+1)·K)
    if module.anchor_per_degree:  # each component its degree's anchor: (N, A, K)
        anchor = anchor.view(orbitals.shape[0], -1, orbitals.shape[-1])[:, DEGREES]
    else:
        anchor = anchor.unsqueeze(1).expand(-1, len(DEGREES), -1)
    stiffness = torch.nn.functional.softplus(module.stiffness)
    n = orbitals.shape[0]
    minima = torch.zeros(int(batch.max()) + 1, orbitals.shape[-1])
    for k in range(orbitals.shape[-1]):
        sign = 1.0 if k % 2 == 0 else -1.0  # σ_k
        laplacian = torch.zeros(n, n)
        laplacian.index_put_((bond_index[1], bond_index[0]), -sign * bond_weight, accumulate=True)
        laplacian.index_put_((bond_index[1], bond_index[1]), bond_weight, accumulate=True)
        for g in range(minima.shape[0]):
            atoms = (batch == g).nonzero().squeeze(1)
            lap = laplacian[atoms][:, atoms]
            for c in range(len(DEGREES)):  # one system per component (the same matrix within a degree)
                a, psi = anchor[atoms, c, k], orbitals[atoms, c, k]
                x = torch.linalg.solve(stiffness[k] * lap + torch.diag(a), a * psi)  # (n_g,)
                # J = ½ s Σ_{ij} L_ij x_i·x_j + ½ Σ a ‖x − ψ‖²
                minima[g, k] += 0.5 * stiffness[k] * (x * (lap @ x)).sum() + 0.5 * (a * (x - psi) ** 2).sum()
    return minima


@pytest.mark.parametrize("per_degree", [False, True], ids=["one_anchor", "anchor_per_degree"])
@pytest.mark.parametrize("dense_max_atoms", [256, 0], ids=["dense", "conjugate_gradients"])
def test_relaxation_is_the_exact_minimiser_graph_by_graph(dense_max_atoms, per_degree):
    torch.manual_seed(0)
    module = make_model(OrbitalElasticity, 0, degrees=DEGREES, num_channels=3, density_width=5,
                        iterations=12, dense_max_atoms=dense_max_atoms,
                        anchor_per_degree=per_degree)
    # a chain of 7 atoms, a ring of 5 with a branch, an isolated atom: one batch
    ring = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3, 4, 0, 5, 2], [1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 2, 5]]) + 7
    bond_index = torch.cat([chain_bonds(7), ring], 1)
    batch = torch.tensor([0] * 7 + [1] * 6 + [2])
    chain_weight = 0.2 + torch.rand(6)
    bond_weight = torch.cat([chain_weight, chain_weight, torch.full((12,), 0.7)])  # w_ij = w_ji
    orbitals, density = torch.randn(14, len(DEGREES), 3), torch.randn(14, 5)
    energies = module(orbitals, density, bond_index, bond_weight, batch, 3)  # (N, L+1, K)
    assert energies.shape == (14, 3, 3) and (energies >= 0).all()
    per_graph = torch.zeros(3, 3).index_add(0, batch, energies.sum(1))
    torch.testing.assert_close(per_graph, dense_minimum(module, orbitals, density, bond_index, bond_weight, batch))
    # each graph alone gives its own energies: the conjugate-gradient steps do not mix graphs
    alone = module(orbitals[:7], density[:7], chain_bonds(7), bond_weight[:12], batch[:7], 1)
    torch.testing.assert_close(alone, energies[:7])
    if dense_max_atoms:
        return
    # too few steps for the 7-atom chain: not the minimum (the steps are what reaches along the chain)
    module.iterations = 2
    short = torch.zeros(3, 3).index_add(0, batch, module(orbitals, density, bond_index, bond_weight, batch, 3).sum(1))
    assert (short[0] - per_graph[0]).abs().max() > 1e-3


@pytest.mark.parametrize("per_degree", [False, True], ids=["one_anchor", "anchor_per_degree"])
def test_dense_solve_and_conjugate_gradients_agree_to_second_derivatives(per_degree):
    """The dense solve (small graphs on a CPU) and the conjugate gradients (large graphs, CUDA, compiled) give the
    same energies, forces-like first derivatives and their parameter derivatives (training), in float64, also with an
    atom bonded to its own periodic image and a graph without bonds; with one anchor per degree as well."""
    torch.manual_seed(1)
    module = make_model(OrbitalElasticity, 0, degrees=DEGREES, num_channels=3, density_width=5, iterations=200,
                        tolerance=1e-12, anchor_per_degree=per_degree).double()
    ring = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3, 4, 0, 5, 2], [1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 2, 5]]) + 7
    self_image = torch.tensor([[14, 14], [14, 14]])  # atom 14 and two of its images (±a)
    bond_index = torch.cat([chain_bonds(7), ring, self_image], 1)
    batch = torch.tensor([0] * 7 + [1] * 6 + [2, 3])  # graph 2: one atom, no bonds
    chain_weight = 0.2 + torch.rand(6)
    bond_weight = torch.cat([chain_weight, chain_weight, torch.full((12,), 0.7), torch.full((2,), 0.3)]).double()
    orbitals = torch.randn(15, len(DEGREES), 3, dtype=torch.float64, requires_grad=True)
    density = torch.randn(15, 5, dtype=torch.float64)
    results = []
    for dense_max_atoms in (256, 0):
        module.dense_max_atoms = dense_max_atoms
        energies = module(orbitals, density, bond_index, bond_weight, batch, 4)
        gradient, = torch.autograd.grad(energies.square().sum(), orbitals, create_graph=True)
        second = torch.autograd.grad(gradient.square().sum(), [module.stiffness, *module.anchor.parameters()])
        results.append((energies, gradient, *second))
    for dense, iterative in zip(*results):
        torch.testing.assert_close(dense, iterative, rtol=1e-9, atol=1e-12)
    # atoms of a graph not together (an unsorted batch): the conjugate gradients, the same energies
    module.dense_max_atoms = 256
    order = torch.randperm(15)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(15)
    shuffled = module(orbitals[order], density[order], inverse[bond_index], bond_weight, batch[order], 4)
    torch.testing.assert_close(shuffled, results[0][0][order], rtol=1e-9, atol=1e-12)
    # graphs of equal size (a batch of one molecule) take the solve without padding
    uniform = torch.cat([chain_bonds(7), chain_bonds(7, 7)], 1), torch.cat([chain_weight, chain_weight] * 2)
    module.dense_max_atoms = 256
    dense = module(orbitals[:14], density[:14], *uniform, torch.arange(14) // 7, 2)
    module.dense_max_atoms = 0
    torch.testing.assert_close(dense, module(orbitals[:14], density[:14], *uniform, torch.arange(14) // 7, 2))


@pytest.mark.parametrize("dense_max_atoms", [256, 0], ids=["dense", "conjugate_gradients"])
def test_a_chain_is_a_series_of_springs(dense_max_atoms):
    """Ends anchored strongly, the middle barely: an end twisted by φ (l = 2, m = ±2 components rotate by 2φ) costs
    ‖u − R u‖² / 2 over n − 1 bonds and the two end anchors in series, i.e. the twist energy falls as 1/length.
    In the σ = −1 channel the untwisted far end is (−1)^(n−1) u, the rest state of
    a cumulene, whose consecutive π systems are perpendicular."""
    module = OrbitalElasticity(DEGREES, 2, 2, iterations=40, min_anchor=1e-9,
                               dense_max_atoms=dense_max_atoms).double()
    module.anchor = torch.nn.Identity()  # anchor = softplus(density): ends softplus(12), middle ~ 0
    for n in (3, 4, 5, 8, 13, 21):
        energies = []
        for phi in (0.0, math.pi / 4):
            psi = torch.zeros(n, len(DEGREES), 2)
            psi[0, 8] = 1.0
            psi[-1, 8], psi[-1, 4] = math.cos(2 * phi), math.sin(2 * phi)
            psi[-1, :, 1] *= (-1) ** (n - 1)  # the σ = −1 channel's rest state
            density = torch.full((n, 2), -40.0)
            density[0] = density[-1] = 12.0
            energies.append(module(psi, density, chain_bonds(n), torch.ones(2 * n - 2),
                                   torch.zeros(n, dtype=torch.long), 1).sum((0, 1)))
        end = torch.nn.functional.softplus(torch.tensor(12.0))
        stiffness = torch.nn.functional.softplus(module.stiffness)  # 1
        # compliances in series: 1/(s w) per bond, 1/a per end
        springs = 0.5 * (2 - 2 * math.cos(math.pi / 2)) / ((n - 1) / stiffness + 2 / end)
        torch.testing.assert_close(energies[0], torch.zeros(2), atol=1e-8, rtol=0)  # the 1e-9 middle anchors
        torch.testing.assert_close(energies[1] - energies[0], springs, rtol=1e-6, atol=0)


def cumulene(n, twist):
    """H₂C=(C=)ₙ₋₂=CH₂ along x, the far CH₂ rotated by ``twist`` about the axis (rad)."""
    pos = [[1.3 * i, 0.0, 0.0] for i in range(n)]
    for end, side in ((0, -1.0), (n - 1, 1.0)):
        angle = twist if end else 0.0
        for s in (1.0, -1.0):
            pos.append([1.3 * end + 0.55 * side, 0.93 * s * math.cos(angle), 0.93 * s * math.sin(angle)])
    return torch.tensor([6] * n + [1] * 4), torch.tensor(pos)


def test_model_with_elastic_energy_sees_a_twist_beyond_its_receptive_field():
    """With the passing off and T = 1 at r_c = 3 Å no atom sees both ends of a 12-carbon chain, except through the
    relaxation along the bonds: the energy depends on the twist, invariantly, the same alone and in a batch."""
    model = make_model(EquiREANN, 0, cutoff=3.0, num_iterations=1, equivariant_passing=False, elastic_channels=2,
                       elastic_iterations=16, density_invariants="cubic", mlp_activation="silu")
    with torch.no_grad():  # weak anchors (~ elastic_min_anchor): the relaxed field reaches over the whole chain
        model.elastic.anchor[-1].bias.fill_(-10.0)
    flat, twisted = cumulene(12, 0.0), cumulene(12, 0.6)
    scales = model.calibrate_density_scale([SimpleNamespace(z=flat[0], pos=flat[1], batch=torch.zeros(16).long())])
    assert (model.elastic_scale != 1).all() and scales.shape == model.density_scale.shape  # RMS of e, per (l, k)
    plain = make_model(EquiREANN, 0, cutoff=3.0, num_iterations=1, equivariant_passing=False,
                       density_invariants="cubic", mlp_activation="silu")
    assert abs(plain(*flat) - plain(*twisted)).item() < 1e-12  # local: blind to the far twist
    assert abs(model(*flat) - model(*twisted)).item() > 1e-2
    z, pos = twisted
    rotation = random_rotation(3)
    torch.testing.assert_close(model(z, pos @ rotation.T), model(z, pos))
    batch = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    both = model(torch.cat([z, flat[0]]), torch.cat([pos, flat[1] + 30.0]), batch)
    torch.testing.assert_close(both, torch.cat([model(z, pos), model(*flat)]))
    out = model.compute(z, pos)
    assert out["elastic_energies"].shape == (16, 3 * 2)


def test_steps_after_convergence_do_not_move_in_float32():
    """On CUDA and compiled every step runs: in float32 a converged system must stay put (a step that divides
    rounding noise by rounding noise would blow it up)."""
    torch.manual_seed(0)
    module = OrbitalElasticity(DEGREES, 2, 2, iterations=64, tolerance=None, dense_max_atoms=0)
    module.anchor = torch.nn.Identity()
    n = 12
    orbitals, density = torch.randn(5 * n, len(DEGREES), 2), torch.full((5 * n, 2), -8.0)
    density[::n] = 5.0  # one end of each chain anchored strongly, the rest weakly
    bond_index = torch.cat([chain_bonds(n, g * n) for g in range(5)], 1)
    batch = torch.arange(5).repeat_interleave(n)
    weight = torch.full((bond_index.shape[1],), 0.3)
    energies = module(orbitals, density, bond_index, weight, batch, 5)
    module.iterations = 2 * n  # converged by then: every chain is a tree of n atoms
    converged = module(orbitals, density, bond_index, weight, batch, 5)
    assert torch.isfinite(energies).all()
    torch.testing.assert_close(energies, converged, rtol=1e-3, atol=1e-6)


def test_dense_solve_of_a_float32_model_with_stiff_springs_and_weak_anchors():
    """A float32 model whose springs are 3·10⁶ times stiffer than its anchors (condition number ~10⁷): the dense
    solve, factorised in float64, gives the float64 model's energy to 3e-5 (a float32 factorisation: 3e-4)."""
    torch.manual_seed(2)
    n = 21
    energies = []
    for dtype in (torch.float32, torch.float64):
        module = OrbitalElasticity(DEGREES, 2, 2, min_anchor=1e-3).to(dtype)
        module.anchor = torch.nn.Identity()
        with torch.no_grad():
            module.stiffness.fill_(3000.0)  # softplus(s) = s
        generator = torch.Generator().manual_seed(0)
        orbitals = torch.randn(n, len(DEGREES), 2, generator=generator).to(dtype)
        density = torch.full((n, 2), -40.0, dtype=dtype)  # anchors ~ a_min
        energies.append(module(orbitals, density, chain_bonds(n), torch.ones(2 * n - 2, dtype=dtype),
                               torch.zeros(n, dtype=torch.long), 1))
    assert torch.isfinite(energies[0]).all()
    torch.testing.assert_close(energies[0].double().sum((0, 1)), energies[1].sum((0, 1)), rtol=1e-4, atol=0)


def test_initial_anchor_sets_every_anchor_at_initialisation():
    """``elastic_initial_anchor``: every atom's anchor starts at that stiffness (the anchor network's output layer
    starts at zero weights); it must lie above the floor."""
    model = EquiREANN(elements=[1, 6], cutoff=3.0, elastic_channels=2, elastic_initial_anchor=0.01)
    density = torch.randn(7, model.elastic.anchor[0].in_features)
    anchor = model.elastic.anchor_stiffness(density)
    torch.testing.assert_close(anchor, torch.full_like(anchor, 0.01))
    with pytest.raises(ValueError, match="elastic_initial_anchor must be above elastic_min_anchor"):
        EquiREANN(elements=[1, 6], cutoff=3.0, elastic_channels=2, elastic_min_anchor=1e-3, elastic_initial_anchor=1e-3)


def test_terminal_index_marks_the_ends_of_the_bond_network():
    """τ_i = ‖Σ_j w r̂‖² / ((Σ_j w)² + ε): ≈ 1 for the hydrogens of a cumulene (one bond), 0 for its straight middle
    and for an isolated atom, small for the planar CH₂ carbon; invariant, and differentiable where the bonds cancel."""
    from pyg_equireann.nn.orbitals import CosineCutoff

    z, pos = cumulene(6, 0.4)
    pos = torch.cat([pos, torch.tensor([[30.0, 0.0, 0.0]])]).double().requires_grad_()  # + an isolated atom
    cutoff = CosineCutoff(2.0)

    def index(positions):
        i, j = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
        keep = i != j
        centers, neighbors = i[keep], j[keep]
        vectors = positions[neighbors] - positions[centers]
        return terminal_index(vectors, cutoff(torch.linalg.vector_norm(vectors, dim=-1)), centers, 11)

    tau = index(pos)
    assert (tau[6:10] > 0.9).all() and (tau[6:10] < 1).all()  # the four H
    assert tau[1:5].abs().max() < 1e-12 and tau[10] == 0  # the middle carbons, the isolated atom
    assert (tau[[0, 5]] > 0).all() and (tau[[0, 5]] < 0.2).all()  # the CH₂ carbons: three bonds at ~120°
    torch.testing.assert_close(index(pos @ random_rotation(3).double().T), tau)
    gradient, = torch.autograd.grad(tau.sum(), pos)
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("dense_max_atoms", [256, 0], ids=["dense", "conjugate_gradients"])
def test_terminal_anchor_pins_the_ends_whatever_the_anchor_network(dense_max_atoms):
    """``terminal_anchor``: with every learned anchor collapsed to ~0 (the failure of the runs that do not
    transfer), the ends of a chain (one bond each, τ ≈ 1) stay anchored at a_t τ and the twist energy is still that
    of the springs in series, 1/length; with no anchor network at all the same."""
    module = OrbitalElasticity(DEGREES, 2, 2, iterations=60, min_anchor=1e-9, dense_max_atoms=dense_max_atoms,
                               terminal_anchor=3.0).double()
    module.anchor = torch.nn.Identity()  # anchor = softplus(density) = softplus(−40) ≈ 0 for every atom
    stiffness = torch.nn.functional.softplus(module.stiffness)
    for n in (3, 5, 9, 16):
        pos = torch.zeros(n, 3, dtype=torch.float64)
        pos[:, 0] = torch.arange(n)
        bonds = chain_bonds(n)
        terminal = terminal_index(pos[bonds[0]] - pos[bonds[1]], torch.ones(2 * n - 2, dtype=torch.float64),
                                  bonds[1], n)
        energies = []
        for phi in (0.0, math.pi / 4):
            psi = torch.zeros(n, len(DEGREES), 2, dtype=torch.float64)
            psi[0, 8] = 1.0
            psi[-1, 8], psi[-1, 4] = math.cos(2 * phi), math.sin(2 * phi)
            psi[-1, :, 1] *= (-1) ** (n - 1)
            density = torch.full((n, 2), -40.0, dtype=torch.float64)
            energies.append(module(psi, density, bonds, torch.ones(2 * n - 2, dtype=torch.float64),
                                   torch.zeros(n, dtype=torch.long), 1, terminal).sum((0, 1)))
        end = 3.0 / (1.0 + 1e-3)  # a_t τ of an atom with one bond of weight 1
        springs = 0.5 * 2 / ((n - 1) / stiffness + 2 / end)
        torch.testing.assert_close(energies[1] - energies[0], springs, rtol=1e-6, atol=0)
    # no anchor network at all: the same anchors (the floor, 10⁻⁹, plus a_t τ), the same energies
    structural = OrbitalElasticity(DEGREES, 2, 2, iterations=60, min_anchor=1e-9, dense_max_atoms=dense_max_atoms,
                                   terminal_anchor=3.0, learned_anchors=False).double()
    assert structural.anchor is None
    torch.testing.assert_close(structural(psi, density, bonds, torch.ones(2 * n - 2, dtype=torch.float64),
                                          torch.zeros(n, dtype=torch.long), 1, terminal),
                               module(psi, density, bonds, torch.ones(2 * n - 2, dtype=torch.float64),
                                      torch.zeros(n, dtype=torch.long), 1, terminal), rtol=1e-7, atol=1e-12)
    with pytest.raises(ValueError, match="needs elastic_terminal_anchor"):
        OrbitalElasticity(DEGREES, 2, 2, learned_anchors=False)
    with pytest.raises(ValueError, match="needs the atoms' terminal indices"):
        module(psi, density, bonds, torch.ones(2 * n - 2, dtype=torch.float64), torch.zeros(n, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="elastic_terminal_anchor must be positive"):
        EquiREANN(elements=[1, 6], cutoff=3.0, elastic_channels=2, elastic_terminal_anchor=0.0)
