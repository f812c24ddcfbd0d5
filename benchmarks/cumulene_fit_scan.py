"""What each EquiREANN variant can represent: fit the 95 energies of the cumulene twist scan directly.

Two targets, both the scan energies of data/cumulene/cumulene_scan.xyz (n = 4..8, 0-90 degrees):
  relaxed  the scan's own geometries (bond lengths change with the twist);
  rigid    each chain's twist = 0 geometry with only the last CH2 rotated to the scanned angle, so
           every 3 A neighbourhood is the same for every angle (pyg_equireann.experiments.cumulene.rigid_scan).
Prints the twist-resolved MAE (meV) per chain length after full-batch Adam on energies only.

Variants: EquiREANN (the paper's fixed passing), EquiREANN with learned passing weights
(+1/-1 over the radial channels at initialisation) and the passing-off ablation.

Usage: python benchmarks/cumulene_fit_scan.py [--steps 400] [--cutoff 3.0] [--iterations 4] [--seed 0]
"""
import argparse
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
from torch_geometric.data import Batch

from pyg_equireann.datamodules.presets import CUMULENE_E0
from pyg_equireann.datamodules.structures import atoms_to_data, attach_edges
from pyg_equireann import EquiREANN
from pyg_equireann.experiments.cumulene import fit_twist, rigid_scan, twist_curves, twist_mae

SCAN = Path(__file__).resolve().parents[1] / "data" / "cumulene" / "cumulene_scan.xyz"


VARIANTS = {
    "EquiREANN": dict(equivariant_passing=True),
    "EquiREANN, learned passing": dict(equivariant_passing=True, learnable_passing=True, passing_init="alternating"),
    "EquiREANN, passing off": dict(equivariant_passing=False),
}


def fit(frames, variant: dict, args) -> dict:
    # float64: the fitted energies drift to large offsets (the loss ignores the per-length mean),
    # and in float32 their round-off (~1 meV steps) would show up as a fake twist curve
    data = [atoms_to_data(a, k, "scan", torch.float64, "energy", None, None) for k, a in enumerate(frames)]
    attach_edges(data, args.cutoff, progress=False)
    batch = Batch.from_data_list(data)
    energy = batch.energy.view(-1)
    n_carbon = np.array([a.info["n_carbon"] for a in frames])
    twist = np.array([a.info["twist"] for a in frames])
    torch.manual_seed(args.seed)
    model = EquiREANN(cutoff=args.cutoff, num_iterations=args.iterations, elements=[1, 6], **variant).double()
    model.set_energy_statistics(atomic_energies=CUMULENE_E0)
    # only the variation within each chain length counts (the per-length offset is composition)
    return fit_twist(model, batch, energy, n_carbon, twist, args.steps, per_length=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cutoff", type=float, default=3.0)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    relaxed = ase.io.read(str(SCAN), index=":")
    targets = {"relaxed": relaxed, "rigid": rigid_scan(relaxed)}
    lengths = sorted({int(a.info["n_carbon"]) for a in relaxed})
    flat = twist_mae(twist_curves(np.zeros(len(relaxed)), [a.get_potential_energy() for a in relaxed],
                                  np.array([a.info["n_carbon"] for a in relaxed]),
                                  np.array([a.info["twist"] for a in relaxed])))
    print(f"cutoff {args.cutoff} Å, {args.iterations} iterations, {args.steps} full-batch steps, seed {args.seed}")
    print("| target | model | " + " | ".join(f"n = {n}" for n in lengths) + " | CPU s |")
    print("|---|---|" + "---|" * (len(lengths) + 1))
    print("| – | flat prediction | " + " | ".join(f"{flat[n]:.1f}" for n in lengths) + " | – |")
    for target, frames in targets.items():
        for name, variant in VARIANTS.items():
            start = time.process_time()
            mae = fit(frames, variant, args)
            print(f"| {target} | {name} | " + " | ".join(f"{mae[n]:.1f}" for n in lengths)
                  + f" | {time.process_time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
