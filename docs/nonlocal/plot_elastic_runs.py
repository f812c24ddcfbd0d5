"""Fraction of the rigid GFN2-xTB twist captured per chain length for every elastic run with the exact solve
(anchor floor 10⁻³ and 10⁻⁵), from the ``*_length_transfer.csv`` files next to this script.

    python docs/nonlocal/plot_elastic_runs.py   # writes docs/img/elastic_anchor_floor_runs.png
"""
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
GROUPS = {  # label: (file pattern, colour)
    "floor 10⁻³, session 9 (66–68 epochs)": ("elastic_dense_s[0-4]_length_transfer.csv", "tab:blue"),
    "floor 10⁻³, session 11 (~100 epochs)": ("elastic_floor3_session11_s*_length_transfer.csv", "tab:cyan"),
    "floor 10⁻⁵, session 10 (67–68 epochs)": ("elastic_floor5_session10_s*_length_transfer.csv", "tab:red"),
    "floor 10⁻⁵, session 11 (97–112 epochs)": ("elastic_floor5_session11_s*_length_transfer.csv", "tab:orange"),
    "floor 10⁻³, session 11, 6.5 CPU-min (63–64 epochs)":
        ("elastic_short_session11_s*_length_transfer.csv", "tab:green"),
}


def main():
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (pattern, colour) in GROUPS.items():
        for k, path in enumerate(sorted(HERE.glob(pattern))):
            rows = list(csv.DictReader(path.open()))
            n = [int(r["n_carbon"]) for r in rows]
            captured = [100 * float(r["captured"]) for r in rows]
            ax.plot(n, captured, "o-", ms=3, lw=1, color=colour, alpha=0.8, label=label if k == 0 else None)
    ax.axvspan(2.5, 8.5, color="0.9", zorder=0, label="training lengths")
    ax.axvspan(12.5, 16.5, color="0.95", hatch="//", zorder=0, label="ends > (T + 1) r_c = 15 Å")
    ax.axhline(50, color="k", ls=":", lw=1)
    ax.set(xlabel="carbons n", ylabel="rigid twist captured (%)", ylim=(-10, 110),
           title="elastic orbital energy, trained on n = 3–8, one line per run")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = HERE.parent / "img" / "elastic_anchor_floor_runs.png"
    fig.savefig(out, dpi=130)
    print(out)


if __name__ == "__main__":
    main()
