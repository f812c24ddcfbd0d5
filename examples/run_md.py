"""Molecular dynamics with ASE and an EquiREANN model (exported ``.pt`` or training checkpoint).

Langevin (NVT) and velocity-Verlet (NVE) runs on a shipped molecule (rMD17 ethanol) or on a periodic
fcc Cu box; prints progress (steps, time, temperature, total-energy change; every tenth of the run, or
``--progress N`` steps), then plots kinetic, potential and total energy and prints the NVE drift.

    python examples/run_md.py --system ethanol --ensemble nve --steps 10000 --plot docs/img/nve_ethanol.png
    python examples/run_md.py --system cu --ensemble langevin --steps 500 --repeat 3
    python examples/run_md.py --model runs/<run>/checkpoints/best.ckpt --system ethanol --dtype float32

Default models: ``examples/models/ethanol_equireann.pt`` (rMD17 ethanol) and
``examples/models/cu_emt_equireann.pt`` (EMT Cu(Al), ``experiment=cu_emt``); see examples/models/README.md.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover
    thermalize_momenta = None
from ase.md.verlet import VelocityVerlet

from pyg_equireann.datamodules.base import default_data_root
from pyg_equireann.deploy.ase import EquiREANNCalculator

HERE = Path(__file__).resolve().parent
MODELS = {"ethanol": HERE / "models/ethanol_equireann.pt", "cu": HERE / "models/cu_emt_equireann.pt"}


def make_system(name: str, repeat: int = 3) -> Atoms:
    """The first rMD17 ethanol training frame, or a cubic fcc Cu supercell (a = 3.59 Å) of repeat³ cells."""
    if name == "ethanol":
        d = np.load(default_data_root() / "rmd17/rmd17_ethanol_train_01.npz")
        return Atoms(numbers=d["nuclear_charges"], positions=d["coords"][0])
    if name == "cu":
        return bulk("Cu", "fcc", a=3.59, cubic=True).repeat(repeat)
    raise ValueError(f"unknown system {name!r}; choose ethanol or cu")


def run_md(atoms: Atoms, calc, ensemble: str = "nve", steps: int = 1000, timestep_fs: float = 1.0,
           temperature: float = 300.0, friction: float = 0.01, interval: int = 10, seed: int = 0,
           progress: int = 0) -> np.ndarray:
    """Run MD; returns rows (time fs, kinetic, potential, total energy eV, temperature K) every ``interval`` steps.
    With ``progress > 0`` prints a line every ``progress`` steps: steps done, elapsed time, temperature and
    the total-energy change since the start (meV/atom)."""
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    if thermalize_momenta is not None:
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    if ensemble == "nve":
        dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    elif ensemble == "langevin":
        dyn = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature, friction=friction / units.fs,
                       fixcm=False, rng=rng)
    else:
        raise ValueError(f"ensemble must be nve or langevin, got {ensemble!r}")
    rows = []

    def record():
        ekin, epot = atoms.get_kinetic_energy(), atoms.get_potential_energy()
        rows.append((dyn.nsteps * timestep_fs, ekin, epot, ekin + epot, atoms.get_temperature()))

    dyn.attach(record, interval=interval)
    if progress > 0:
        start, e0 = time.perf_counter(), atoms.get_total_energy()

        def report():
            if dyn.nsteps == 0:
                return
            change = 1e3 * (atoms.get_total_energy() - e0) / len(atoms)
            print(f"step {dyn.nsteps}/{steps} ({100 * dyn.nsteps / steps:.0f}%) | {time.perf_counter() - start:.1f} s | "
                  f"T {atoms.get_temperature():.1f} K | E_total - E_total(0) {change:+.4f} meV/atom", flush=True)

        dyn.attach(report, interval=progress)
    dyn.run(steps)
    return np.array(rows)


def drift(rows: np.ndarray, num_atoms: int) -> dict:
    """Total-energy drift per atom: slope of a linear fit × run length, largest |E(t) − E(0)|, and the
    standard deviation of E(t) around the fit (meV/atom)."""
    t, total = rows[:, 0], rows[:, 3]
    if len(t) < 3:
        raise ValueError(f"only {len(t)} recorded frames: run more steps than 2 × --interval")
    slope, intercept = np.polyfit(t, total, 1)
    return {"drift_meV_per_atom": 1e3 * slope * (t[-1] - t[0]) / num_atoms,
            "max_deviation_meV_per_atom": 1e3 * np.abs(total - total[0]).max() / num_atoms,
            "fluctuation_meV_per_atom": 1e3 * np.std(total - (slope * t + intercept)) / num_atoms}


def plot(rows: np.ndarray, num_atoms: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rows[:, 0] / 1000.0
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    offset = rows[0, 2]  # potential energies relative to the first frame's
    axes[0].plot(t, rows[:, 1], label="kinetic", lw=0.6)
    axes[0].plot(t, rows[:, 2] - offset, label="potential − E_pot(0)", lw=0.6)
    axes[0].plot(t, rows[:, 3] - offset, label="total − E_pot(0)", lw=1.0, color="k")
    axes[0].set_ylabel("energy (eV)")
    axes[0].legend(loc="upper right")
    axes[0].set_title(title)
    axes[1].plot(t, 1e3 * (rows[:, 3] - rows[0, 3]) / num_atoms, lw=0.8, color="k")
    axes[1].set_ylabel("total − total(0) (meV/atom)")
    axes[1].set_xlabel("time (ps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="exported .pt2 (or an older TorchScript .pt) or training .ckpt (default: the shipped model of --system)")
    parser.add_argument("--system", default="ethanol", choices=["ethanol", "cu"])
    parser.add_argument("--repeat", type=int, default=3, help="Cu supercell: repeat³ cubic cells (4 atoms each)")
    parser.add_argument("--ensemble", default="nve", choices=["nve", "langevin"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K (initial velocities and thermostat)")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin (Å)")
    parser.add_argument("--interval", type=int, default=10, help="record every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=int, default=None,
                        help="print progress every this many steps (default: a tenth of the run; 0: off)")
    parser.add_argument("--plot", type=Path, help="write an energy plot (PNG)")
    parser.add_argument("--save", type=Path, help="write the energy rows (.npy)")
    args = parser.parse_args(argv)

    atoms = make_system(args.system, args.repeat)
    calc = EquiREANNCalculator(args.model or MODELS[args.system], device=args.device, dtype=args.dtype, skin=args.skin)
    start = time.perf_counter()
    progress = max(1, args.steps // 10) if args.progress is None else args.progress
    print(f"{args.ensemble} {args.system}: {len(atoms)} atoms, {args.steps} steps of {args.timestep} fs", flush=True)
    rows = run_md(atoms, calc, args.ensemble, args.steps, args.timestep, args.temperature, interval=args.interval,
                  seed=args.seed, progress=progress)
    seconds = time.perf_counter() - start
    result = drift(rows, len(atoms))
    result.update(steps=args.steps, atoms=len(atoms), seconds=seconds, neighbor_builds=calc.num_neighbor_builds,
                  mean_temperature_K=float(rows[:, 4].mean()))
    print(f"{args.ensemble} {args.system} ({len(atoms)} atoms, {calc.dtype}), {args.steps} steps of {args.timestep} fs "
          f"in {seconds:.1f} s; neighbour list built {calc.num_neighbor_builds} times")
    print(f"mean T {result['mean_temperature_K']:.1f} K; total-energy drift {result['drift_meV_per_atom']:+.4f} meV/atom, "
          f"max |E(t)-E(0)| {result['max_deviation_meV_per_atom']:.4f} meV/atom, "
          f"fluctuation {result['fluctuation_meV_per_atom']:.4f} meV/atom")
    if args.save:
        np.save(args.save, rows)
    if args.plot:
        plot(rows, len(atoms), args.plot, f"{args.ensemble.upper()} {args.system}, {len(atoms)} atoms, "
             f"{args.timestep} fs, {args.steps * args.timestep / 1000:g} ps, {calc.dtype}")
        print(f"written: {args.plot}")
    return result


if __name__ == "__main__":
    main()
