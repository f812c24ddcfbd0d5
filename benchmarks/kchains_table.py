"""Smallest number of message-passing iterations that separates the k-chain pair (Joshi et al.,
ICML 2023), for EquiREANN (two random initialisations), its passing-off ablation and REANN.

Usage: python benchmarks/kchains_table.py [--max-iterations 6] [--kmax 8]
Random weights (non-zero last layers), float64, cutoff 1.75 Å with 1.0 Å bonds (bonded pairs only).
"""
import argparse

from pyg_equireann import REANN, EquiREANN
from pyg_equireann.experiments.kchains import model_factory as factory
from pyg_equireann.experiments.kchains import separation_table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-iterations", type=int, default=6)
    parser.add_argument("--kmax", type=int, default=8)
    args = parser.parse_args()
    models = {
        "EquiREANN (seed 0)": factory(EquiREANN, 0),
        "EquiREANN (seed 1)": factory(EquiREANN, 1),
        "EquiREANN, passing off": factory(EquiREANN, equivariant_passing=False),
        "REANN": factory(REANN, elements=[6]),
    }
    print(separation_table(models, range(2, args.kmax + 1), args.max_iterations))


if __name__ == "__main__":
    main()
