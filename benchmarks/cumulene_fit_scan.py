"""What each EquiREANN variant can represent: fit the 95 energies of the cumulene twist scan directly.

Two targets, both the scan energies of data/cumulene/cumulene_scan.xyz (n = 4..8, 0-90 degrees):
  relaxed  the scan's own geometries (bond lengths change with the twist);
  rigid    each chain's twist = 0 geometry with only the last CH2 rotated to the scanned angle, so
           every 3 A neighbourhood is the same for every angle (pyg_equireann.experiments.cumulene.rigid_scan).
Prints the twist-resolved MAE (meV) per chain length after full-batch Adam on energies only
(pyg_equireann.experiments.cumulene.fit_scan): equal steps, not an equal-budget training.

Variants (conf/model/<name>.yaml, elements H and C, no 1/n̄): EquiREANN (the paper's fixed passing),
EquiREANN with learned passing weights (+1/-1 over the radial channels at initialisation) and the
passing-off ablation.

Multi-hop passing (conf/model/equireann_multihop.yaml, passing_hops hops per iteration) is one more variant;
``--hops 2 4`` adds one entry per hop count (``--norm off|both``: also with the un-normalised hop weight f(d)),
``--nonbacktracking on|both`` runs the hops on directed edges (passing_nonbacktracking, P >= 3; ``--eps`` sets
passing_norm_eps), ``--targets rigid`` fits only the rigid scans, ``--models`` picks the variants (config names).
``--targets rigid_xtb --lengths 13 14 15 16`` fits the rigid twists of data/cumulene/cumulene_rigid.xyz (n = 3-16,
their own GFN2-xTB energies) of the chosen lengths instead: can a model represent a twist beyond its receptive field?

Usage: python benchmarks/cumulene_fit_scan.py [--steps 400] [--cutoff 3.0] [--iterations 4] [--seed 0] [--hops 2]
"""
import argparse
import time
from pathlib import Path

import ase.io
import numpy as np
import torch

from pyg_equireann.experiments.cumulene import fit_scan, rigid_scan, twist_curves, twist_mae
from pyg_equireann.experiments.harness import model_configs

SCAN = Path(__file__).resolve().parents[1] / "data" / "cumulene" / "cumulene_scan.xyz"
RIGID_XTB = SCAN.with_name("cumulene_rigid.xyz")
VARIANTS = {"EquiREANN": "equireann", "EquiREANN, learned passing": "equireann_learned_passing",
            "EquiREANN, passing off": "equireann_nopassing", "EquiREANN, multi-hop": "equireann_multihop"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cutoff", type=float, default=3.0)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hops", type=int, nargs="+", default=[2], help="passing_hops of the multi-hop variant(s)")
    parser.add_argument("--norm", choices=["on", "off", "both"], default="on",
                        help="passing_norm of the multi-hop variant(s)")
    parser.add_argument("--nonbacktracking", choices=["on", "off", "both"], default="off",
                        help="passing_nonbacktracking of the multi-hop variant(s) (P >= 3)")
    parser.add_argument("--eps", type=float, default=None, help="passing_norm_eps of the multi-hop variant(s)")
    parser.add_argument("--targets", nargs="+", default=["relaxed", "rigid"], choices=["relaxed", "rigid", "rigid_xtb"],
                        help="rigid_xtb: the rigid twists of cumulene_rigid.xyz with their own GFN2-xTB energies")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="chain lengths of the rigid_xtb target (default: all, n = 3-16)")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS.values()), choices=list(VARIANTS.values()))
    args = parser.parse_args()
    torch.set_num_threads(1)
    changes = {"cutoff": args.cutoff, "num_iterations": args.iterations, "elements": [1, 6], "avg_num_neighbors": None}
    configs = model_configs(args.models, {name: changes for name in args.models})
    variants = {}
    for label, name in VARIANTS.items():
        if name not in args.models:
            continue
        if name != "equireann_multihop":
            variants[label] = configs[name]
            continue
        norms = {"on": [True], "off": [False], "both": [True, False]}[args.norm]
        walks = {"on": [True], "off": [False], "both": [False, True]}[args.nonbacktracking]
        for hops in args.hops:
            for norm in norms:
                for nb in walks:
                    if nb and hops < 3:
                        continue
                    config = dict(configs[name])
                    config["passing_hops"], config["passing_norm"], config["passing_nonbacktracking"] = hops, norm, nb
                    if args.eps is not None:
                        config["passing_norm_eps"] = args.eps
                    name_ = f"{label} (P = {hops}{'' if norm else ', f/n̄ hops'}{', non-backtracking' if nb else ''})"
                    variants[name_] = config
    relaxed = ase.io.read(str(SCAN), index=":")
    targets = {}
    if "relaxed" in args.targets:
        targets["relaxed"] = relaxed
    if "rigid" in args.targets:
        targets["rigid"] = rigid_scan(relaxed)
    if "rigid_xtb" in args.targets:
        frames = [a for a in ase.io.read(str(RIGID_XTB), index=":")
                  if args.lengths is None or int(a.info["n_carbon"]) in args.lengths]
        for atoms in frames:
            atoms.info["energy"] = atoms.get_potential_energy()
        targets["rigid_xtb"] = frames
    if len({tuple(sorted({int(a.info["n_carbon"]) for a in f})) for f in targets.values()}) > 1:
        parser.error("--targets rigid_xtb with --lengths other than 4-8 cannot be combined with relaxed/rigid")
    reference = next(iter(targets.values()))
    lengths = sorted({int(a.info["n_carbon"]) for a in reference})
    energies = [a.info["energy"] if "energy" in a.info else a.get_potential_energy() for a in reference]
    flat = twist_mae(twist_curves(np.zeros(len(reference)), energies,
                                  np.array([a.info["n_carbon"] for a in reference]),
                                  np.array([a.info["twist"] for a in reference])))
    print(f"cutoff {args.cutoff} Å, {args.iterations} iterations, {args.steps} full-batch steps, seed {args.seed}; "
          f"receptive field (T + 1) × P × r_c = {(args.iterations + 1) * args.cutoff:g} Å × P")
    print("| target | model | " + " | ".join(f"n = {n}" for n in lengths) + " | CPU s |")
    print("|---|---|" + "---|" * (len(lengths) + 1))
    print("| – | flat prediction | " + " | ".join(f"{flat[n]:.1f}" for n in lengths) + " | – |")
    for target, frames in targets.items():
        for label, config in variants.items():
            start = time.process_time()
            mae = fit_scan(frames, config, args.steps, args.seed)
            print(f"| {target} | {label} | " + " | ".join(f"{mae[n]:.1f}" for n in lengths)
                  + f" | {time.process_time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
