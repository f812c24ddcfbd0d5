"""Per-frame force errors of two models on the same test frames, from the ``errors.csv`` that ``equireann-eval``
writes: how correlated they are, on how many frames the first is better, quantiles, and the share of the total
error in the worst tenth of the frames ("Where the two lose and win on the same frames", docs/accuracy.md).

    equireann-eval ckpt_path=<run>/checkpoints/best.ckpt data=rmd17 data.molecule=malonaldehyde   # per model
    python docs/accuracy/per_frame_errors.py <eval folder of model A> <eval folder of model B>
"""
import csv
import sys

import numpy as np


def forces_mae(folder):
    with open(f"{folder}/errors.csv", newline="") as f:
        return np.array([float(row["forces_mae_meV_per_A"]) for row in csv.DictReader(f) if row["set"] == "test"])


def main(first, second):
    a, b = forces_mae(first), forces_mae(second)
    print(f"frames {len(a)}; mean {a.mean():.2f} / {b.mean():.2f} meV/Å; Pearson {np.corrcoef(a, b)[0, 1]:.2f}; "
          f"first better on {100 * (a < b).mean():.0f} % of the frames")
    for q in (0.5, 0.9, 0.99):
        print(f"  quantile {q:g}: {np.quantile(a, q):.1f} / {np.quantile(b, q):.1f}")
    for name, x in (("first", a), ("second", b)):
        worst = np.sort(x)[::-1][:len(x) // 10]
        print(f"  {name}: worst tenth of the frames carries {100 * worst.sum() / x.sum():.0f} % of the total error")


if __name__ == "__main__":
    main(*sys.argv[1:3])
