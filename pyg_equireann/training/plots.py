"""Learning curves and parity plots (matplotlib, Agg backend)."""
from pathlib import Path
from typing import Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curve(run_dir: Path, out_png: Path) -> Optional[Path]:
    """Training loss and validation force/energy MAE against epoch from the run's CSV logs
    (``logs*/metrics.csv``; a resumed run adds one folder per resumption)."""
    import csv

    rows = []
    for metrics_csv in sorted(Path(run_dir).glob("logs*/metrics.csv")):
        with open(metrics_csv, newline="") as f:
            rows.extend(csv.DictReader(f))
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for column, ax, label in (("train/loss", axes[0], "training loss"), ("val/loss", axes[0], "validation loss"),
                              ("val/forces_mae", axes[1], "validation force MAE (meV/Å)"),
                              ("val/energy_per_atom_mae", axes[1], "validation energy MAE (meV/atom)")):
        points = [(float(r["epoch"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
        if points:
            ax.plot(*zip(*points), label=label)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_title("loss")
    axes[1].set_title("validation error (EMA weights)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def parity(results: Dict[str, Dict[str, np.ndarray]], out_png: Path) -> Path:
    """Energy-per-atom and force-component parity for each named test set."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, r in results.items():
        axes[0].scatter(r["energy_ref_per_atom"], r["energy_pred_per_atom"], s=4, alpha=0.6, label=name)
        if r.get("forces_ref") is not None and len(r["forces_ref"]):
            axes[1].scatter(r["forces_ref"], r["forces_pred"], s=1, alpha=0.3, label=name)
    for ax, title, unit in ((axes[0], "energy", "eV/atom"), (axes[1], "force components", "eV/Å")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(title)
        ax.locator_params(axis="x", nbins=5)  # per-atom energies have long tick labels
        ax.legend(markerscale=4)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
