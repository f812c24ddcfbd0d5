"""Cumulene data H₂C(=C)ₙ₋₂CH₂ with GFN2-xTB (tblite, the optional extra ``pip install 'pyg_equireann[xtb]'``).

Generates the length-transfer and beyond-the-receptive-field test data of docs/nonlocal.md
(``data/cumulene/generate.py`` writes the shipped files):

* :func:`rigid_scan_frames`: the twist = 0 chain relaxed with its end-to-end dihedral held at 0, then only the
  last CH₂ rotated rigidly about the C₀···Cₙ₋₁ axis (every distance within a few Å unchanged), with GFN2-xTB
  energies and forces at each angle: only information passed along the chain can tell these frames apart;
* :func:`md_frames`: Langevin MD (ASE) at 300–600 K from the constrained-relaxed chain at a grid twist, held near
  it by a harmonic restraint on the end-to-end dihedral; the stored energies and forces are the unbiased GFN2-xTB
  values, frames centred and randomly rotated.

Atom order and info keys follow ``data/cumulene/README.md``: C₀..Cₙ₋₁, two H on C₀, two H on Cₙ₋₁; ``n_carbon``,
``twist`` (dihedral between the terminal H–C–H planes about the C₀···Cₙ₋₁ axis, folded to 0..90°), ``cc_dist``,
``twist_target``, ``config_type``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

def xtb_calculator():
    """A GFN2-xTB calculator (tblite, electronic temperature 300 K, quiet); ImportError naming the extra."""
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        raise ImportError("the cumulene generator needs tblite: pip install 'pyg_equireann[xtb]'") from err
    return TBLite(method="GFN2-xTB", electronic_temperature=300.0, max_iterations=1000, verbosity=0)


def build_chain(n: int, twist: float = 0.0, cc: float = 1.29, ch: float = 1.09, hch: float = 117.0):
    """A straight cumulene C_nH_4 along x, centred, the first CH₂ in the xy plane and the last one rotated by
    ``twist`` degrees about x (ase Atoms, no calculator)."""
    from ase import Atoms

    if n < 2:
        raise ValueError(f"a cumulene needs n >= 2 carbons, got {n}")
    x = (np.arange(n) - (n - 1) / 2) * cc
    half = np.radians(hch / 2)
    dx, dy = ch * np.cos(half), ch * np.sin(half)
    phi = np.radians(twist)
    pos = [[xi, 0.0, 0.0] for xi in x]
    pos += [[x[0] - dx, dy, 0.0], [x[0] - dx, -dy, 0.0]]
    pos += [[x[-1] + dx, s * dy * np.cos(phi), s * dy * np.sin(phi)] for s in (1.0, -1.0)]
    return Atoms("C" * n + "H4", positions=pos)


def end_twist(positions: np.ndarray) -> float:
    """Twist (degrees, folded to 0..90) between the terminal H–C–H planes about the C₀···Cₙ₋₁ axis of a cumulene
    in the atom order above."""
    n = len(positions) - 4
    axis = positions[n - 1] - positions[0]
    axis = axis / np.linalg.norm(axis)
    ends = [positions[n] - positions[n + 1], positions[n + 2] - positions[n + 3]]  # H–H vectors
    a, b = (v - (v @ axis) * axis for v in ends)
    cos = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))))


def _dihedral_atoms(n: int) -> List[List[int]]:
    """The two H–C₀···Cₙ₋₁–H dihedrals that fix the twist of both terminal CH₂ planes."""
    return [[n, 0, n - 1, n + 2], [n + 1, 0, n - 1, n + 3]]


def signed_twist(positions: np.ndarray) -> tuple:
    """The signed twist (radians) between the terminal H–H vectors about the C₀···Cₙ₋₁ axis (the dihedral of
    C₀ + (H₁ − H₂), C₀, Cₙ₋₁, Cₙ₋₁ + (H₃ − H₄), ASE convention) and its gradient (N, 3) with respect to the
    positions."""
    from ase.geometry import get_dihedrals

    n = len(positions) - 4
    c0, c1 = positions[0], positions[n - 1]
    u, v = positions[n] - positions[n + 1], positions[n + 2] - positions[n + 3]
    points = np.stack([c0 + u, c0, c1, c1 + v])
    phi = np.radians(get_dihedrals([points[1] - points[0]], [points[2] - points[1]], [points[3] - points[2]])[0])
    d = _dihedral_gradient(points)
    grad = np.zeros_like(positions)
    grad[0] += d[0] + d[1]
    grad[n - 1] += d[2] + d[3]
    grad[n] += d[0]
    grad[n + 1] -= d[0]
    grad[n + 2] += d[3]
    grad[n + 3] -= d[3]
    return float(phi), grad


def relax(atoms, twist: float, fmax: float = 0.01, steps: int = 500):
    """Relax ``atoms`` with GFN2-xTB (BFGS) with the last CH₂ turned to ``twist`` degrees and both H–C₀···Cₙ₋₁–H
    dihedrals held (ASE ``FixInternals``), so the twist of the planes stays; returns a new Atoms without
    constraints and the number of steps."""
    from ase.constraints import FixInternals
    from ase.optimize import BFGS

    atoms = atoms.copy()
    n = len(atoms) - 4
    atoms.set_dihedral(*_dihedral_atoms(n)[0], twist, indices=[n + 2, n + 3])
    atoms.set_constraint(FixInternals(dihedrals_deg=[[atoms.get_dihedral(*d), d] for d in _dihedral_atoms(n)]))
    atoms.calc = xtb_calculator()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    out = atoms.copy()
    out.set_constraint()
    out.calc = None
    return out, int(opt.nsteps)


def _label(atoms, **info):
    """Attach unbiased GFN2-xTB energy and forces (SinglePointCalculator) and info keys; returns atoms."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = atoms.copy()
    atoms.set_constraint()
    atoms.calc = xtb_calculator()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    n = len(atoms) - 4
    atoms.info.update(n_carbon=n, twist=end_twist(atoms.positions),
                      cc_dist=float(np.linalg.norm(atoms.positions[n - 1] - atoms.positions[0])), **info)
    return atoms


def rigid_scan_frames(n: int, angles: Sequence[float] = tuple(range(0, 95, 5))) -> list:
    """The chain relaxed at twist 0, then the last CH₂ rotated rigidly to each of ``angles`` (degrees), each with
    GFN2-xTB energy and forces (``config_type`` ``rigid_scan``)."""
    from pyg_equireann.experiments.cumulene import rigid_twist

    base, nsteps = relax(build_chain(n), 0.0)
    frames = []
    for angle, atoms in zip(angles, rigid_twist(base, angles)):
        frames.append(_label(atoms, twist_target=float(angle), opt_steps=nsteps, config_type="rigid_scan"))
    return frames


class TwistRestraint(Calculator):
    """ASE calculator: GFN2-xTB plus ½ k (φ − φ₀)² on the signed twist φ of :func:`signed_twist` (``k`` in eV/rad²,
    ``target_deg`` φ₀ in degrees): the sampling bias of :func:`md_frames` (never stored)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, target_deg: float, k: float = 20.0):
        super().__init__()
        self.target, self.k = np.radians(float(target_deg)), float(k)
        self.xtb = xtb_calculator()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.xtb
        energy, forces = a.get_potential_energy(), a.get_forces().copy()
        phi, grad = signed_twist(a.positions)
        delta = np.arctan2(np.sin(phi - self.target), np.cos(phi - self.target))
        forces -= self.k * delta * grad
        self.results = {"energy": energy + 0.5 * self.k * delta**2, "forces": forces}


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3×3 rotation matrix (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _dihedral_gradient(p: np.ndarray) -> np.ndarray:
    """Gradient (4, 3) of ASE's dihedral angle (radians) of the points p (4, 3) (Blondel & Karplus, J. Comput.
    Chem. 17, 1132 (1996))."""
    f, g, h = p[0] - p[1], p[1] - p[2], p[3] - p[2]
    a, b = np.cross(f, g), np.cross(h, g)
    a2, b2, lg = a @ a, b @ b, np.linalg.norm(g)
    d0, d3 = -lg / a2 * a, lg / b2 * b
    cross_terms = (f @ g) / (a2 * lg) * a - (h @ g) / (b2 * lg) * b
    return np.stack([d0, -d0 + cross_terms, -d3 - cross_terms, d3])


def md_frames(n: int, grid_twist: float, seed: int, num_frames: int = 4, equilibration: int = 400,
              interval: int = 100, timestep_fs: float = 0.5, temperature: Optional[float] = None,
              split: str = "test") -> list:
    """``num_frames`` Langevin-MD frames of C_nH_4 restrained near ``grid_twist`` (degrees): start from the chain
    relaxed at that twist, Maxwell–Boltzmann velocities, ``equilibration`` steps, then one frame every ``interval``
    steps; temperature uniform in 300–600 K unless given. Frames centred, randomly rotated, with unbiased
    GFN2-xTB energies and forces."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    temperature = float(rng.uniform(300.0, 600.0)) if temperature is None else float(temperature)
    atoms, _ = relax(build_chain(n, grid_twist), grid_twist, fmax=0.05)
    atoms.calc = TwistRestraint(grid_twist)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature, friction=0.01 / units.fs, rng=rng)
    dyn.run(equilibration)
    frames = []
    for k in range(num_frames):
        if k:
            dyn.run(interval)
        frame = atoms.copy()
        frame.positions -= frame.positions.mean(0)
        frame.positions = frame.positions @ random_rotation(rng).T
        frames.append(_label(frame, twist_target=float(grid_twist), grid_twist=float(grid_twist),
                             temperature=temperature, traj_id=int(seed), frame=k, split=split, config_type="md"))
    return frames
