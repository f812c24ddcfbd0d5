"""In-domain twist error against length transfer for every elastic run whose report is next to this script
(``elastic_*_report.md``, one ``equireann-nonlocal "run=[equireann_elastic]"`` run each): the runs that fit the
twist of n = 3–8 best (sessions 8–12) are among those that do not transfer; session 13's fail at moderate fits too.

    python docs/nonlocal/plot_elastic_fit_vs_transfer.py   # writes docs/img/elastic_fit_vs_transfer.png
"""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PASSING_OFF = 631.6  # meV, in-domain twist MAE of the passing-off ablation (docs/nonlocal.md)
GROUPS = [  # label, file-name pattern, colour, marker
    ("the config, conjugate gradients (sessions 8–9)", r"elastic_(s\d|final_s\d|cg_rerun_s\d)_", "tab:gray", "s"),
    ("the config, exact solve (sessions 9–12)",
     r"elastic_(dense_s\d|floor[35]_session1[01]_s\d|short_session11_s\d|epochs100_session12_s\d)_", "tab:blue", "o"),
    ("4 elastic channels (session 12)", r"elastic_k4_session12_", "tab:orange", "D"),
    ("anchors per degree (session 12)", r"elastic_perdegree_session12_", "tab:green", "^"),
    ("terminal anchors a_t·τ (session 13)", r"elastic_terminal_session13_", "tab:purple", "v"),
    ("terminal anchors, weak start (session 13)", r"elastic_termweak_session13_", "tab:brown", "P"),
    ("terminal anchors only, no anchor network (session 13)", r"elastic_structural_session13_", "tab:pink", "*"),
    ("other variants (weak initial anchors, no hops, relative anchors, envelope)",
     r"elastic_(weakinit|nohops|dense_nohops|relative|envelope_\w+)_s\d_", "tab:red", "x"),
]
ROW = re.compile(r"^\| EquiREANN, elastic orbital energy \| [\d,]+ \| (\d+) \|.*\| ([\d.]+) \|$", re.M)
TRANSFER = re.compile(r"elastic orbital energy: new lengths, twist MAE ÷ twist-blind ([\d.]+)")


def runs():
    """(group index, file name, epochs, in-domain twist MAE in meV, length transfer) of every report."""
    for path in sorted(HERE.glob("elastic_*_report.md")):
        text = path.read_text()
        row, transfer = ROW.search(text), TRANSFER.search(text)
        group = next((i for i, (_, pattern, _, _) in enumerate(GROUPS) if re.match(pattern, path.name)), None)
        if row and transfer and group is not None:
            yield group, path.name, int(row.group(1)), float(row.group(2)), float(transfer.group(1))


def main():
    fig, ax = plt.subplots(figsize=(7, 5.6))
    found = list(runs())
    for i, (label, _, colour, marker) in enumerate(GROUPS):
        points = [(fit / PASSING_OFF, transfer) for g, _, _, fit, transfer in found if g == i]
        if points:
            ax.scatter(*zip(*points), color=colour, marker=marker, s=28, label=f"{label} ({len(points)})")
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.axvline(0.2, color="k", ls=":", lw=1)
    ax.text(0.198, 0.02, "in-domain target ≤ 0.2", ha="right", va="bottom", fontsize=7,
            transform=ax.get_xaxis_transform())
    ax.text(0.005, 0.49, "length-transfer target ≤ 0.5", va="top", fontsize=7)
    ax.set(xlabel="in-domain twist MAE ÷ passing off (n = 4–8)",
           ylabel="length transfer, twist MAE ÷ twist-blind (n = 9–16)",
           title="elastic runs trained on n = 3–8: in-domain fit against length transfer", xlim=(0, None))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    out = HERE.parent / "img" / "elastic_fit_vs_transfer.png"
    fig.savefig(out, dpi=130, bbox_inches="tight")
    for group, name, epochs, fit, transfer in sorted(found, key=lambda r: r[3]):
        print(f"{fit:7.1f} meV ({fit / PASSING_OFF:.3f})  transfer {transfer:.3f}  {epochs:4d} epochs  {name}")
    print(out)


if __name__ == "__main__":
    main()
