"""Generate the cumulene length-transfer data (GFN2-xTB through tblite: pip install 'pyg_equireann[xtb]').

Writes, next to this file (pyg_equireann.experiments.cumulene_xtb has the protocols):

* ``cumulene_rigid.xyz``: for every chain length of --rigid-lengths (default 3..16), the chain relaxed at twist 0
  with only the last CH2 then rotated rigidly to 0, 10, ..., 90 degrees; GFN2-xTB energies and forces of exactly
  these frames (every distance within a few Å is the same at every angle);
* ``cumulene_long_test.xyz``: Langevin-MD frames of chains longer than any in the training set (--md-lengths,
  default 9..16), 300-600 K, restrained near each twist of --grid, --trajectories trajectories per length and
  twist, --frames frames each; unbiased GFN2-xTB energies and forces, centred and randomly rotated.

    python data/cumulene/generate.py                     # the shipped files, ~15 CPU-min
    python data/cumulene/generate.py --md-lengths 9 10 11 12 13 14 15 16 --split train --trajectories 4 \\
        --md-out cumulene_long_train.xyz --no-rigid        # more MD frames of long chains, e.g. to train on

Deterministic for a given --seed (each trajectory's seed comes from SeedSequence([seed, n, grid index, trajectory])).
"""
import argparse
import time
from pathlib import Path

import numpy as np
from ase.io import write

from pyg_equireann.experiments.cumulene_xtb import md_frames, rigid_scan_frames

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rigid-lengths", type=int, nargs="+", default=list(range(3, 17)))
    parser.add_argument("--rigid-angles", type=float, nargs="+", default=[float(a) for a in range(0, 91, 10)])
    parser.add_argument("--md-lengths", type=int, nargs="+", default=list(range(9, 17)))
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0, 18.0, 36.0, 54.0, 72.0, 90.0])
    parser.add_argument("--trajectories", type=int, default=1)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--rigid-out", default="cumulene_rigid.xyz")
    parser.add_argument("--md-out", default="cumulene_long_test.xyz")
    parser.add_argument("--no-rigid", action="store_true")
    parser.add_argument("--no-md", action="store_true")
    args = parser.parse_args()

    if not args.no_rigid:
        start, frames = time.process_time(), []
        for n in args.rigid_lengths:
            frames += rigid_scan_frames(n, args.rigid_angles)
        write(HERE / args.rigid_out, frames, format="extxyz")
        print(f"{args.rigid_out}: {len(frames)} frames, {time.process_time() - start:.0f} CPU-s", flush=True)
    if not args.no_md:
        start, frames = time.process_time(), []
        for n in args.md_lengths:
            for g, twist in enumerate(args.grid):
                for t in range(args.trajectories):
                    seed = int(np.random.SeedSequence([args.seed, n, g, t]).generate_state(1)[0])
                    frames += md_frames(n, twist, seed, num_frames=args.frames, split=args.split)
            print(f"  n = {n}: {len(frames)} frames so far, {time.process_time() - start:.0f} CPU-s", flush=True)
        write(HERE / args.md_out, frames, format="extxyz")
        print(f"{args.md_out}: {len(frames)} frames, {time.process_time() - start:.0f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
