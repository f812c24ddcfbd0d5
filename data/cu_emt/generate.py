"""Generate the shipped periodic Cu(Al) EMT data set (``data/cu_emt``); deterministic, ~10 s.

fcc Cu supercells (2x2x2 = 32 and 3x3x3 = 108 atoms of the cubic cell, a0 = 3.59 Å) with 0-4 Cu
atoms replaced by Al, a random symmetric strain (each component uniform in ±3 %) and Gaussian
displacements (σ 0.02-0.10 Å). Energies, forces and stress from ASE's EMT calculator.

    python data/cu_emt/generate.py
"""
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

A0 = 3.59
HERE = Path(__file__).resolve().parent


def structure(rng: np.random.Generator, repeat: int):
    atoms = bulk("Cu", "fcc", a=A0, cubic=True).repeat(repeat)
    num_al = int(rng.integers(0, 5))
    atoms.numbers[rng.choice(len(atoms), num_al, replace=False)] = 13
    strain = rng.uniform(-0.03, 0.03, (3, 3))
    strain = 0.5 * (strain + strain.T)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + strain), scale_atoms=True)
    sigma = float(rng.uniform(0.02, 0.10))
    atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
    atoms.calc = EMT()
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    atoms.info.update(num_al=num_al, rattle_sigma=round(sigma, 4))
    return atoms


def main() -> None:
    rng = np.random.default_rng(2024)
    sets = {"train.xyz": (80, 16), "test.xyz": (16, 8)}  # (32-atom frames, 108-atom frames)
    for name, (small, large) in sets.items():
        frames = [structure(rng, 2) for _ in range(small)] + [structure(rng, 3) for _ in range(large)]
        write(HERE / name, frames, format="extxyz")
        print(f"{name}: {len(frames)} frames")


if __name__ == "__main__":
    main()
