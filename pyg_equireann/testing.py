"""Physics checks for any interatomic potential ``model(z, pos, batch=None, cell=None, pbc=None) -> (B,)``
(energies in eV, positions in Å, forces by autograd), in float64.

Checks (each raises an AssertionError naming what broke and by how much, and returns its measurements):

* :func:`check_o3_invariance`: E(xRᵀ) = E(x) and F(xRᵀ) = F(x)Rᵀ for a rotation and a rotation-reflection;
* :func:`check_forces_finite_differences`: F = −∂E/∂x against central finite differences (also in a cell);
* :func:`check_translation`, :func:`check_permutation`: E and F under a shift and a relabelling of atoms;
* :func:`check_batch`: a batch of several structures gives each structure's energy and forces alone;
* :func:`check_cutoff_smoothness`: E and F continuous as a neighbour crosses ``model.cutoff``;
* :func:`check_stress_finite_strain`: stress σ = V⁻¹ ∂E/∂ε against finite strains of positions and cell;
* :func:`check_periodic_images`: wrapping atoms by lattice vectors, a 2×1×1 supercell (2E), rotating
  positions and cell together, and a batch of a bulk and a slab cell;
* :func:`check_refuses_cell`: a model without periodic boundary conditions raises instead of ignoring a cell.

Random weights with zero-initialised output layers make energies constant and every check vacuous:
give the model non-zero weights everywhere first (:func:`~pyg_equireann.utils.perturb_parameters`).

Run them on your own model::

    from pyg_equireann.testing import check_model
    from pyg_equireann.utils import perturb_parameters

    model = perturb_parameters(MyPotential(...).double())
    check_model(model, elements=[1, 6, 8])  # periodic=None: the periodic checks if the model accepts a cell

or inherit them as pytest tests (as NequIP's ``BaseModelTests``), one test per check::

    import pytest
    from pyg_equireann.testing import PhysicsTests

    class TestMyPotential(PhysicsTests):
        @pytest.fixture
        def model(self):  # or a module-level fixture with scope="module", to build it once
            return perturb_parameters(MyPotential(...).double())

        @pytest.fixture
        def periodic(self):  # default: whether the model accepts a cell
            return True

The module needs pytest (the ``test`` extra). Every model config of the package runs through
:class:`PhysicsTests` in ``tests/test_physics_suite.py``, built by :func:`model_from_config` as
``equireann-train float64=true`` builds it.
"""
import inspect
import math
from types import SimpleNamespace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import pytest
import torch
from torch import Tensor, nn

from pyg_equireann.graph.forces import energy_forces_stress, strained_inputs
from pyg_equireann.utils import default_dtype, perturb_parameters

#: relative tolerance (max |difference| / max |reference|) of exact symmetries in float64
SYMMETRY_RTOL = 1e-10
#: relative tolerance of autograd derivatives against central finite differences (step 1e-5, float64)
DERIVATIVE_RTOL = 1e-6


class Structure(NamedTuple):
    """Atomic numbers z (N,), positions pos (N, 3) Å, and for periodic structures cell (3, 3) Å (lattice
    vectors as rows) and pbc (3,)."""

    z: Tensor
    pos: Tensor
    cell: Optional[Tensor] = None
    pbc: Optional[Tensor] = None


def rel(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b| (the largest error relative to the largest reference value)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def random_rotation(seed: int, reflect: bool = False) -> Tensor:
    """A random proper rotation (3, 3) float64, times −1 (a rotation-reflection) with ``reflect``."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return -q if reflect else q


def molecule(elements: Sequence[int] = (1, 6, 8), num_atoms: int = 6, seed: int = 0) -> Structure:
    """A compact random cluster: every atom 1.0-1.5 Å from an earlier one and ≥ 0.9 Å from all; the
    elements cycle through ``elements`` in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.tensor(list(elements), dtype=torch.long)[torch.arange(num_atoms) % len(elements)]
    z = z[torch.randperm(num_atoms, generator=gen)]
    pos = torch.zeros(1, 3, dtype=torch.float64)
    while len(pos) < num_atoms:
        direction = torch.nn.functional.normalize(torch.randn(3, generator=gen, dtype=torch.float64), dim=0)
        anchor = pos[torch.randint(len(pos), (1,), generator=gen)]
        candidate = anchor + (1.0 + 0.5 * torch.rand(1, generator=gen, dtype=torch.float64)) * direction
        if float((pos - candidate).norm(dim=1).min()) >= 0.9:
            pos = torch.cat([pos, candidate])
    return Structure(z, pos)


def crystal(elements: Sequence[int] = (1, 6, 8), num_atoms: int = 4, seed: int = 0,
            pbc: Sequence[bool] = (True, True, True)) -> Structure:
    """A skewed cell (rows ~3.2 Å, shorter than twice any cutoff here, so several images of every atom are
    neighbours) with ``num_atoms`` atoms ≥ 0.9 Å from each other and from every image."""
    gen = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[3.2, 0.0, 0.0], [0.8, 3.0, 0.0], [0.4, 0.6, 3.4]], dtype=torch.float64)
    images = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=torch.float64)] * 3, indexing="ij"), -1)
    images = images.view(-1, 3) @ cell
    z = torch.tensor(list(elements), dtype=torch.long)[torch.arange(num_atoms) % len(elements)]
    pos = torch.empty(0, 3, dtype=torch.float64)
    while len(pos) < num_atoms:
        candidate = torch.rand(1, 3, generator=gen, dtype=torch.float64) @ cell
        others = torch.cat([pos, candidate])[:, None, :] + images[None]  # (n, 27, 3) images of all atoms
        distances = (others - candidate).norm(dim=-1)
        distances[-1, 13] = math.inf  # the candidate itself (image (0, 0, 0))
        if float(distances.min()) >= 0.9:
            pos = torch.cat([pos, candidate])
    return Structure(z, pos, cell, torch.tensor(list(pbc)))


# --------------------------------------------------------------------------- evaluation


def _uses_precomputed_graph(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes a precomputed graph (``edge_shift``): then forces and stress come from
    :func:`~pyg_equireann.graph.forces.energy_forces_stress`, the path of training and the ASE calculator."""
    try:
        return "edge_shift" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def evaluate(model: nn.Module, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None, cell: Optional[Tensor] = None,
             pbc: Optional[Tensor] = None, stress: bool = False) -> Dict[str, Tensor]:
    """Energy (B,), forces −∂E/∂x (N, 3) and with ``stress`` σ = V⁻¹ ∂E/∂ε (B, 3, 3), detached.

    Models whose forward takes a precomputed graph go through
    :func:`~pyg_equireann.graph.forces.energy_forces_stress`; any other model is differentiated through its
    forward, for stress with positions and cell deformed by a symmetric strain x → x(1 + ε)."""
    if _uses_precomputed_graph(model):
        out = energy_forces_stress(model, z, pos, batch, cell, pbc, compute_stress=stress)
        return {k: v.detach() for k, v in out.items()}
    if batch is None:
        batch = torch.zeros(len(z), dtype=torch.long, device=z.device)
    pos = pos.detach().requires_grad_(True)
    num_graphs = 1 if cell is None else cell.view(-1, 3, 3).shape[0]
    inputs, strained_pos, cells = strained_inputs(pos, batch, cell, num_graphs, stress)
    energy = energy_of(model, z, strained_pos, batch, cells, pbc)
    grads = torch.autograd.grad(energy.sum(), inputs)
    out = {"energy": energy.detach(), "forces": -grads[0]}
    if stress:
        out["stress"] = grads[1] / torch.linalg.det(cell.view(-1, 3, 3).to(pos.dtype)).abs().view(-1, 1, 1)
    return out


def energy_of(model: nn.Module, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
              cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None) -> Tensor:
    """``model(z, pos, batch)``, with ``cell=`` and ``pbc=`` for periodic structures: energies (B,)."""
    if cell is None:
        return model(z, pos, batch).view(-1)
    return model(z, pos, batch, cell=cell, pbc=pbc).view(-1)


def _nontrivial(forces: Tensor, name: str) -> None:
    assert float(forces.abs().max()) > 1e-6, (
        f"{name}: forces are zero (max |F| = {float(forces.abs().max()):.1e} eV/Å), so the check proves "
        "nothing; give the model non-zero output layers (pyg_equireann.utils.perturb_parameters)")


def _within(name: str, what: str, error: float, tolerance: float) -> float:
    assert error <= tolerance, f"{name}: {what} differs by {error:.2e} (relative), more than {tolerance:.0e}"
    return error


# --------------------------------------------------------------------------- checks


def check_o3_invariance(model: nn.Module, structure: Structure, seed: int = 1,
                        rtol: float = SYMMETRY_RTOL) -> Dict[str, float]:
    """E(xRᵀ) = E(x) and F(xRᵀ) = F(x)Rᵀ for a random rotation R and a rotation-reflection −R."""
    z, pos = structure.z, structure.pos
    out = evaluate(model, z, pos)
    _nontrivial(out["forces"], "O(3) invariance")
    errors = {}
    for reflect in (False, True):
        R = random_rotation(seed, reflect)
        moved = evaluate(model, z, pos @ R.T)
        kind = "rotation-reflection" if reflect else "rotation"
        errors[f"energy_{kind}"] = _within("O(3) invariance", f"energy after a {kind}",
                                           rel(moved["energy"], out["energy"]), rtol)
        errors[f"forces_{kind}"] = _within("O(3) equivariance", f"forces after a {kind}",
                                           rel(moved["forces"], out["forces"] @ R.T), rtol)
    return errors


def check_forces_finite_differences(model: nn.Module, structure: Structure, h: float = 1e-5,
                                    rtol: float = DERIVATIVE_RTOL) -> Dict[str, float]:
    """Autograd forces against central finite differences −(E(x + h e) − E(x − h e)) / 2h of every
    coordinate (3N pairs of energies)."""
    z, pos, cell, pbc = structure
    cells = None if cell is None else cell.view(-1, 3, 3)
    forces = evaluate(model, z, pos, None, cells, pbc)["forces"]
    _nontrivial(forces, "forces = −∇E")
    fd = torch.zeros_like(pos)
    with torch.no_grad():
        for i in range(len(z)):
            for a in range(3):
                plus, minus = pos.clone(), pos.clone()
                plus[i, a] += h
                minus[i, a] -= h
                fd[i, a] = -float(energy_of(model, z, plus, None, cells, pbc)
                                  - energy_of(model, z, minus, None, cells, pbc)) / (2 * h)
    return {"forces": _within("forces = −∇E", "autograd from finite differences", rel(forces, fd), rtol)}


def check_translation(model: nn.Module, structure: Structure, shift: Sequence[float] = (3.0, -7.0, 11.0),
                      rtol: float = SYMMETRY_RTOL) -> Dict[str, float]:
    """E(x + t) = E(x) and F(x + t) = F(x)."""
    z, pos = structure.z, structure.pos
    out = evaluate(model, z, pos)
    moved = evaluate(model, z, pos + torch.tensor(shift, dtype=pos.dtype))
    return {"energy": _within("translation invariance", "energy", rel(moved["energy"], out["energy"]), rtol),
            "forces": _within("translation invariance", "forces", rel(moved["forces"], out["forces"]), rtol)}


def check_permutation(model: nn.Module, structure: Structure, seed: int = 3,
                      rtol: float = SYMMETRY_RTOL) -> Dict[str, float]:
    """Relabelling the atoms leaves E unchanged and permutes F."""
    z, pos = structure.z, structure.pos
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    out = evaluate(model, z, pos)
    permuted = evaluate(model, z[perm], pos[perm])
    return {"energy": _within("permutation invariance", "energy", rel(permuted["energy"], out["energy"]), rtol),
            "forces": _within("permutation equivariance", "forces",
                              rel(permuted["forces"], out["forces"][perm]), rtol)}


def check_batch(model: nn.Module, structures: Sequence[Structure], rtol: float = SYMMETRY_RTOL) -> Dict[str, float]:
    """Energies and forces of a batch of ``structures`` (all periodic, or none) equal each structure's alone."""
    single = [evaluate(model, s.z, s.pos, None, None if s.cell is None else s.cell.view(-1, 3, 3), s.pbc)
              for s in structures]
    z = torch.cat([s.z for s in structures])
    pos = torch.cat([s.pos for s in structures])
    batch = torch.cat([torch.full((len(s.z),), i, dtype=torch.long) for i, s in enumerate(structures)])
    cell = pbc = None
    if structures[0].cell is not None:
        cell = torch.stack([s.cell for s in structures])
        pbc = torch.stack([torch.as_tensor(s.pbc) for s in structures])
    both = evaluate(model, z, pos, batch, cell, pbc)
    alone = {k: torch.cat([s[k] for s in single]) for k in ("energy", "forces")}
    return {"energy": _within("batch = each alone", "energies", rel(both["energy"], alone["energy"]), rtol),
            "forces": _within("batch = each alone", "forces", rel(both["forces"], alone["forces"]), rtol)}


def check_cutoff_smoothness(model: nn.Module, elements: Sequence[int] = (1, 6, 8), cutoff: Optional[float] = None,
                            deltas: Sequence[float] = (1e-2, 1e-3)) -> Dict[str, float]:
    """E and F continuous as a neighbour crosses the cutoff r_c (``model.cutoff``): atom C moves radially
    through r_c from atom A while staying beyond r_c of atom B. Beyond r_c, C is an isolated atom, so the
    jumps E(r_c − δ) − E(r_c + δ) and F(r_c − δ) − F(r_c + δ) must vanish with δ: at the smaller δ (10× smaller)
    they must be at most 1/5 of those at the larger (a continuous E whose forces jump at r_c gives 1/10 for E
    but 1 for F). Returns the jumps and their orders log₁₀(jump(δ₀)/jump(δ₁))."""
    rc = float(cutoff if cutoff is not None else model.cutoff)
    z = torch.tensor([elements[1 % len(elements)], elements[-1], elements[0]], dtype=torch.long)
    direction = torch.nn.functional.normalize(torch.tensor([-1.0, 0.3, 0.0], dtype=torch.float64), dim=0)

    def at(distance):
        pos = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
        pos[2] = distance * direction
        return evaluate(model, z, pos)

    energy_jumps, force_jumps, scale = [], [], 0.0
    for delta in deltas:
        inside, outside = at(rc - delta), at(rc + delta)
        energy_jumps.append(float((inside["energy"] - outside["energy"]).abs().max()))
        force_jumps.append(float((inside["forces"] - outside["forces"]).abs().max()))
        scale = max(scale, float(inside["energy"].abs().max()), float(inside["forces"].abs().max()))
    floor = 1e-12 * (1.0 + scale)  # rounding of float64 energies
    result = {"energy_jump": energy_jumps[-1], "forces_jump": force_jumps[-1],
              "energy_order": math.log10(max(energy_jumps[0], floor) / max(energy_jumps[-1], floor)),
              "forces_order": math.log10(max(force_jumps[0], floor) / max(force_jumps[-1], floor))}
    assert energy_jumps[-1] <= 0.2 * energy_jumps[0] + floor, (
        f"cutoff smoothness: the energy jumps by {energy_jumps} eV as a neighbour crosses r_c = {rc} Å ± {list(deltas)} Å "
        "(not vanishing with the distance to r_c: the energy is discontinuous at the cutoff)")
    assert force_jumps[-1] <= 0.2 * force_jumps[0] + floor, (
        f"cutoff smoothness: the forces jump by {force_jumps} eV/Å as a neighbour crosses r_c = {rc} Å ± {list(deltas)} Å "
        "(not vanishing with the distance to r_c: the forces are discontinuous at the cutoff)")
    return result


def check_stress_finite_strain(model: nn.Module, structure: Structure, h: float = 1e-5,
                               rtol: float = DERIVATIVE_RTOL) -> Dict[str, float]:
    """Stress σ = V⁻¹ ∂E/∂ε (autograd) is symmetric, non-zero and equals central finite differences of the
    energy under symmetric strains of positions and cell, x → x(1 ± ε)."""
    z, pos, cell, pbc = structure
    stress = evaluate(model, z, pos, None, cell.view(-1, 3, 3), pbc, stress=True)["stress"][0]
    assert float(stress.abs().max()) > 1e-6, f"stress: zero ({float(stress.abs().max()):.1e} eV/Å³), the check proves nothing"
    volume = float(torch.linalg.det(cell).abs())
    fd = torch.zeros(3, 3, dtype=torch.float64)
    with torch.no_grad():
        for a in range(3):
            for b in range(a, 3):
                strain = torch.zeros(3, 3, dtype=torch.float64)
                # off-diagonal: h/2 in (a, b) and (b, a) changes E by V·σ_ab·h, as h in (a, a) does
                strain[a, b] = strain[b, a] = h if a == b else h / 2
                plus, minus = torch.eye(3, dtype=torch.float64) + strain, torch.eye(3, dtype=torch.float64) - strain
                value = float(energy_of(model, z, pos @ plus, None, (cell @ plus)[None], pbc)
                              - energy_of(model, z, pos @ minus, None, (cell @ minus)[None], pbc)) / (2 * h)
                fd[a, b] = fd[b, a] = value / volume
    return {"symmetry": _within("stress", "σ from σᵀ", rel(stress.T, stress), SYMMETRY_RTOL),
            "stress": _within("stress = V⁻¹ ∂E/∂ε", "autograd from finite strains", rel(stress, fd), rtol)}


def check_periodic_images(model: nn.Module, structure: Structure, slab: Optional[Structure] = None, seed: int = 5,
                          rtol: float = SYMMETRY_RTOL) -> Dict[str, float]:
    """For a periodic ``structure``: moving atoms by lattice vectors changes nothing; a 2×1×1 supercell has
    twice the energy and the same forces; rotating (and reflecting) positions and cell together rotates forces
    and stress; a batch with ``slab`` (another cell, periodic in some directions) equals each alone."""
    z, pos, cell, pbc = structure
    cells = cell[None]
    out = evaluate(model, z, pos, None, cells, pbc, stress=True)
    _nontrivial(out["forces"], "periodic images")
    errors = {}
    n = torch.randint(-2, 3, (len(z), 3), generator=torch.Generator().manual_seed(seed)).to(pos.dtype)
    wrapped = evaluate(model, z, pos + n @ cell, None, cells, pbc)
    errors["wrapped_energy"] = _within("periodic images", "energy after moving atoms by lattice vectors",
                                       rel(wrapped["energy"], out["energy"]), rtol)
    errors["wrapped_forces"] = _within("periodic images", "forces after moving atoms by lattice vectors",
                                       rel(wrapped["forces"], out["forces"]), rtol)
    supercell = cell.clone()
    supercell[0] *= 2
    double = evaluate(model, z.repeat(2), torch.cat([pos, pos + cell[0]]), None, supercell[None], pbc)
    errors["supercell_energy"] = _within("periodic images", "energy of a 2×1×1 supercell from 2E",
                                         rel(double["energy"], 2 * out["energy"]), rtol)
    errors["supercell_forces"] = _within("periodic images", "forces in a 2×1×1 supercell",
                                         rel(double["forces"], out["forces"].repeat(2, 1)), rtol)
    R = random_rotation(seed, reflect=True)
    moved = evaluate(model, z, pos @ R.T, None, (cell @ R.T)[None], pbc, stress=True)
    errors["rotated_energy"] = _within("periodic O(3)", "energy after rotating positions and cell",
                                       rel(moved["energy"], out["energy"]), rtol)
    errors["rotated_forces"] = _within("periodic O(3)", "forces after rotating positions and cell",
                                       rel(moved["forces"], out["forces"] @ R.T), rtol)
    errors["rotated_stress"] = _within("periodic O(3)", "stress after rotating positions and cell",
                                       rel(moved["stress"][0], R @ out["stress"][0] @ R.T), 10 * rtol)
    if slab is not None:
        errors.update({f"batch_{k}": v for k, v in check_batch(model, [structure, slab], rtol).items()})
    return errors


#: what a model without periodic boundary conditions may raise for a cell (TypeError: no ``cell`` argument)
REFUSALS = (ValueError, NotImplementedError, TypeError)


def check_refuses_cell(model: nn.Module, structure: Structure) -> Dict[str, float]:
    """A model without periodic boundary conditions raises (ValueError, NotImplementedError, or TypeError
    without a ``cell`` argument) when given a cell, instead of returning the energy of the isolated atoms."""
    with pytest.raises(REFUSALS):
        energy_of(model, structure.z, structure.pos, None, structure.cell[None], structure.pbc)
    return {}


# --------------------------------------------------------------------------- all checks


def supports_pbc(model: nn.Module, structure: Optional[Structure] = None) -> bool:
    """Whether ``model`` accepts a periodic cell (raises none of :data:`REFUSALS` for one)."""
    s = structure or crystal()
    try:
        with torch.no_grad():
            energy_of(model, s.z, s.pos, None, s.cell[None], s.pbc)
    except REFUSALS:
        return False
    return True


def _check_float64(model: nn.Module) -> None:
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float64})
    if wrong:
        raise ValueError(f"the physics checks need a float64 model (model.double()); it has {', '.join(wrong)} parameters")


def physics_checks(elements: Sequence[int] = (1, 6, 8), periodic: bool = False,
                   has_cutoff: bool = True) -> Dict[str, Callable[[nn.Module], Dict[str, float]]]:
    """{check name: check(model) → measurements} on the standard tiny structures: a 6-atom and a 5-atom
    cluster of ``elements``; with ``periodic`` a 4-atom skewed bulk cell and a 3-atom slab."""
    mol, other = molecule(elements, 6, seed=0), molecule(elements, 5, seed=1)
    bulk, slab = crystal(elements, 4, seed=0), crystal(elements, 3, seed=1, pbc=(True, True, False))
    checks = {
        "o3_invariance": lambda m: check_o3_invariance(m, mol),
        "forces_finite_differences": lambda m: check_forces_finite_differences(m, mol),
        "translation": lambda m: check_translation(m, mol),
        "permutation": lambda m: check_permutation(m, mol),
        "batch": lambda m: check_batch(m, [mol, other, molecule(elements, 3, seed=2)]),
    }
    if has_cutoff:
        checks["cutoff_smoothness"] = lambda m: check_cutoff_smoothness(m, elements)
    if periodic:
        checks["forces_finite_differences_periodic"] = lambda m: check_forces_finite_differences(m, bulk)
        checks["stress_finite_strain"] = lambda m: check_stress_finite_strain(m, bulk)
        checks["periodic_images"] = lambda m: check_periodic_images(m, bulk, slab)
    else:
        checks["refuses_cell"] = lambda m: check_refuses_cell(m, bulk)
    return checks


def check_model(model: nn.Module, elements: Sequence[int] = (1, 6, 8), periodic: Optional[bool] = None,
                checks: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """Run every physics check on a float64 ``model(z, pos, batch, cell=None, pbc=None) -> (B,)``.

    Args:
        elements: atomic numbers the test structures use (ones the model knows).
        periodic: run the periodic checks (True), check that a cell is refused (False), or decide by
            whether the model accepts a cell (None).
        checks: names of the checks to run (default all; see :func:`physics_checks`).

    Returns ``{check: {measurement: value}}`` (relative errors, jumps, orders); raises an AssertionError
    listing every failed check.
    """
    _check_float64(model)
    if periodic is None:
        periodic = supports_pbc(model, crystal(elements))
    table = physics_checks(elements, periodic, has_cutoff=getattr(model, "cutoff", None) is not None)
    unknown = set(checks or ()) - set(table)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; choose from {sorted(table)}")
    results: Dict[str, Dict[str, float]] = {}
    failures: List[str] = []
    for name, check in table.items():
        if checks is None or name in checks:
            try:
                results[name] = check(model)
            except AssertionError as err:
                failures.append(f"{name}: {err}")
    if failures:
        raise AssertionError(f"{type(model).__name__} fails {len(failures)} physics check(s):\n" + "\n".join(failures))
    return results


class PhysicsTests:
    """Every physics check as a pytest test. Subclass it in a test file and provide a ``model`` fixture (a
    float64 model with non-zero weights); override the ``periodic`` fixture (True/False; default: whether the
    model accepts a cell) and ``elements`` (atomic numbers of the test structures, default H, C, O)."""

    @pytest.fixture
    def elements(self) -> Sequence[int]:
        return (1, 6, 8)

    @pytest.fixture
    def periodic(self, model, elements) -> bool:
        return supports_pbc(model, crystal(elements))

    def _run(self, name: str, model: nn.Module, elements: Sequence[int], periodic: bool = False):
        _check_float64(model)
        return physics_checks(elements, periodic)[name](model)

    def test_o3_invariance(self, model, elements):
        self._run("o3_invariance", model, elements)

    def test_forces_finite_differences(self, model, elements):
        self._run("forces_finite_differences", model, elements)

    def test_translation(self, model, elements):
        self._run("translation", model, elements)

    def test_permutation(self, model, elements):
        self._run("permutation", model, elements)

    def test_batch(self, model, elements):
        self._run("batch", model, elements)

    def test_cutoff_smoothness(self, model, elements):
        if getattr(model, "cutoff", None) is None:
            pytest.skip(f"{type(model).__name__} has no cutoff attribute")
        self._run("cutoff_smoothness", model, elements)

    def test_periodic(self, model, elements, periodic):
        if periodic:
            self._run("forces_finite_differences_periodic", model, elements, periodic=True)
            self._run("stress_finite_strain", model, elements, periodic=True)
            self._run("periodic_images", model, elements, periodic=True)
        else:
            self._run("refuses_cell", model, elements, periodic=False)


# --------------------------------------------------------------------------- package models


_SMALL_EQUIREANN = ["model.num_channels=8", "model.num_radial=4", "++model.message_hidden=[16]",
                    "++model.readout_hidden=[16]"]
#: Hydra overrides that make each ``conf/model`` config small enough for tests (the configs' defaults are the
#: published sizes): ``model_from_config(name, SMALL_MODEL_OVERRIDES[name])``.
SMALL_MODEL_OVERRIDES = {
    "equireann": _SMALL_EQUIREANN,
    "equireann_paper": _SMALL_EQUIREANN,
    "equireann_large": ["model.num_channels=12", "model.num_radial=4", "model.message_hidden=[16,16]",
                        "model.readout_hidden=[16,16]"],
    "equireann_learned_passing": _SMALL_EQUIREANN,
    "equireann_multihop": _SMALL_EQUIREANN,
    "equireann_nonbacktracking": _SMALL_EQUIREANN,
    "equireann_elastic": _SMALL_EQUIREANN,
    "equireann_nopassing": _SMALL_EQUIREANN,
    "reann": _SMALL_EQUIREANN,
    "schnet": ["model.hidden_channels=16", "model.num_filters=16", "model.num_interactions=2",
               "model.num_gaussians=16"],
    "dimenetpp": ["model.hidden_channels=16", "model.num_blocks=1", "model.int_emb_size=8",
                  "model.basis_emb_size=4", "model.out_emb_channels=16", "model.num_spherical=3",
                  "model.num_radial=3"],
    "visnet": ["model.hidden_channels=16", "model.num_layers=2", "model.num_rbf=8"],
    "mace": ["model.hidden_irreps=8x0e+8x1o", "model.radial_mlp=[8,8]", "model.correlation=2"],
}


def model_from_config(name: str, overrides: Sequence[str] = (), elements: Sequence[int] = (1, 6, 8),
                      avg_num_neighbors: float = 4.0, seed: int = 0,
                      build_dtype: torch.dtype = torch.float64) -> nn.Module:
    """The model of ``conf/model/<name>.yaml`` as ``equireann-train float64=true`` builds it (Hydra composition
    with ``overrides`` such as ``model.num_channels=8``, ``auto`` entries filled by
    :func:`~pyg_equireann.training.prepare.prepare_model_config` with ``elements`` and ``avg_num_neighbors``,
    :func:`~pyg_equireann.training.module.build_model` under the default dtype ``build_dtype``), then in float64
    with random non-zero weights (:func:`~pyg_equireann.utils.perturb_parameters`) and non-zero reference
    energies, scale and shift.

    Constants a model computes at construction (e.g. MACE's Wigner 3j symbols and contraction matrices) keep
    the precision of ``build_dtype`` after ``.double()``."""
    from hydra import compose, initialize_config_dir

    from pyg_equireann.config import CONF_DIR
    from pyg_equireann.training.module import build_model
    from pyg_equireann.training.prepare import prepare_model_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", *overrides])
    data = SimpleNamespace(elements=list(elements), statistics={"avg_num_neighbors": avg_num_neighbors})
    torch.manual_seed(seed)
    with default_dtype(build_dtype):
        model = build_model(prepare_model_config(cfg.model, data)).double()
    perturb_parameters(model, seed)
    model.set_energy_statistics(atomic_energies={z: -0.5 * (i + 1) for i, z in enumerate(elements)},
                                scale=0.7, shift=0.1)
    return model.eval()
