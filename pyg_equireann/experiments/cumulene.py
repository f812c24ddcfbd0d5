"""Cumulene twist analysis: twist-resolved errors, rigid-twist geometries and twist-curve plots.

A cumulene C_nH_4 (``data/cumulene``) has the atom order C_0..C_(n-1), two H on C_0, two H on
C_(n-1). Its energy depends on the twist φ between the two terminal H–C–H planes through the
conjugated chain, also when the chain ends are farther apart than a model's cutoff.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np


def frame_info(path: str | os.PathLike, keys: Sequence[str] = ("n_carbon", "twist", "cc_dist")) -> Dict[str, np.ndarray]:
    """Per-frame ``atoms.info`` values of an extxyz file as arrays (one entry per frame, file order)."""
    import ase.io

    frames = ase.io.read(str(path), index=":")
    out = {}
    for key in keys:
        missing = [k for k, a in enumerate(frames) if key not in a.info]
        if missing:
            raise KeyError(f"{path}: frame {missing[0]} has no info key {key!r}")
        out[key] = np.array([a.info[key] for a in frames])
    return out


def twist_curves(energy_pred: np.ndarray, energy_ref: np.ndarray, n_carbon: np.ndarray,
                 twist: np.ndarray) -> Dict[int, Dict[str, np.ndarray]]:
    """For each chain length n: the twist angles (degrees, sorted) and the reference and predicted
    twist energies ΔE(φ) = E(φ) − E(φ_min) in meV, where φ_min is the smallest angle of the scan
    (0° in the shipped scan). Energies in eV, one entry per scan frame."""
    energy_pred, energy_ref = np.asarray(energy_pred, np.float64), np.asarray(energy_ref, np.float64)
    curves = {}
    for n in sorted(set(int(v) for v in n_carbon)):
        k = np.flatnonzero(n_carbon == n)
        k = k[np.argsort(twist[k], kind="stable")]
        curves[n] = {"twist": np.asarray(twist[k], np.float64),
                     "ref": (energy_ref[k] - energy_ref[k[0]]) * 1e3,
                     "pred": (energy_pred[k] - energy_pred[k[0]]) * 1e3}
    return curves


def twist_mae(curves: Mapping[int, Mapping[str, np.ndarray]]) -> Dict[int, float]:
    """Twist-resolved energy MAE (meV) per chain length: mean |ΔE_pred(φ) − ΔE_ref(φ)| over the scan."""
    return {n: float(np.abs(c["pred"] - c["ref"]).mean()) for n, c in curves.items()}


def twist_mae_centered(curves: Mapping[int, Mapping[str, np.ndarray]]) -> Dict[int, float]:
    """Mean-referenced twist MAE (meV) per chain length: mean |(E_pred − ⟨E_pred⟩) − (E_ref − ⟨E_ref⟩)| over the
    scan, ⟨·⟩ the mean over the twist angles. Unlike :func:`twist_mae` it does not hinge on the error at one
    reference angle (a miss at the cusp of φ = 0 shifts every ΔE(φ) of that metric)."""
    out = {}
    for n, c in curves.items():
        pred, ref = np.asarray(c["pred"], np.float64), np.asarray(c["ref"], np.float64)
        out[n] = float(np.abs((pred - pred.mean()) - (ref - ref.mean())).mean())
    return out


def twist_captured(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of a reference twist curve that a prediction captures: the least-squares factor a of
    pred − ⟨pred⟩ ≈ a (ref − ⟨ref⟩) (1: the full curve, 0: flat, negative: the wrong sign). NaN for a flat
    reference."""
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    ref_c, pred_c = ref - ref.mean(), pred - pred.mean()
    norm = float(ref_c @ ref_c)
    return float(pred_c @ ref_c / norm) if norm > 0 else float("nan")


def fit_twist(model, batch, energy, n_carbon: np.ndarray, twist: np.ndarray, steps: int, lr: Optional[float] = None,
              per_length: bool = False, optimizer: str = "adam") -> Dict[int, float]:
    """Fit ``model`` to the energies (eV, (B,)) of a cumulene ``batch`` (``z``, ``pos``, ``batch``,
    ``edge_index``) by full-batch minimisation of the squared error, then return its twist-resolved
    MAE per chain length (meV, :func:`twist_mae`). ``per_length``: only the variation within each chain
    length counts (each length's mean error is subtracted).

    ``optimizer``: ``"adam"`` (amsgrad, ``steps`` steps, ``lr`` default 0.01) or ``"lbfgs"`` (at most
    ``steps`` iterations with a strong-Wolfe line search, ``lr`` default 1; on a small full batch it
    reaches the same fit in a fraction of the gradient evaluations).
    """
    import torch

    groups = [torch.as_tensor(n_carbon == n) for n in sorted(set(n_carbon.tolist()))] if per_length else None

    def loss_fn():
        error = model(batch.z, batch.pos, batch.batch, edge_index=batch.edge_index) - energy
        if groups is None:
            return error.square().mean()
        return sum((error[g] - error[g].mean()).square().mean() for g in groups)

    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01 if lr is None else lr, amsgrad=True)
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS(model.parameters(), lr=1.0 if lr is None else lr, max_iter=steps, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    with torch.no_grad():
        pred = model(batch.z, batch.pos, batch.batch, edge_index=batch.edge_index).numpy()
    return twist_mae(twist_curves(pred, energy.detach().numpy(), n_carbon, twist))


def fit_scan(frames, model_config: Mapping, steps: int, seed: int = 0) -> Dict[int, float]:
    """Twist-resolved MAE (meV) per chain length of a fresh float64 model (``model_config``, a Hydra
    config; graphs at its cutoff; seeded with ``seed``; cumulene E0) fitted by :func:`fit_twist` with
    ``steps`` full-batch Adam steps to the energies of the scan ``frames`` (ase Atoms with info
    ``n_carbon``, ``twist``, ``energy``); only the variation within each chain length counts."""
    import torch
    from torch_geometric.data import Batch

    from pyg_equireann.datamodules.presets import CUMULENE_E0
    from pyg_equireann.datamodules.structures import atoms_to_data, attach_edges
    from pyg_equireann.training.module import build_model

    # float64: the fitted energies drift to large offsets (the loss ignores the per-length mean),
    # and in float32 their round-off (~1 meV steps) would show up as a fake twist curve
    data = [atoms_to_data(a, k, "scan", torch.float64, "energy", None, None) for k, a in enumerate(frames)]
    attach_edges(data, float(model_config["cutoff"]), progress=False)
    batch = Batch.from_data_list(data)
    n_carbon = np.array([a.info["n_carbon"] for a in frames])
    twist = np.array([a.info["twist"] for a in frames])
    torch.manual_seed(seed)
    model = build_model(model_config).double()
    model.set_energy_statistics(atomic_energies=CUMULENE_E0)
    return fit_twist(model, batch, batch.energy.view(-1), n_carbon, twist, steps, per_length=True)


def rigid_twist(atoms, angles_deg: Sequence[float]):
    """Copies of a cumulene ``atoms`` with the last CH2 group (the last two atoms) rotated rigidly by
    each angle (degrees) about the axis through the two terminal carbons; nothing else moves.

    Every interatomic distance within reach of a short cutoff stays the same, so a model whose
    messages are invariant and whose cutoff does not span the chain must give a flat curve.
    """
    n = len(atoms) - 4
    pos = atoms.get_positions()
    origin, axis = pos[n - 1], pos[n - 1] - pos[0]
    axis = axis / np.linalg.norm(axis)
    out = []
    for angle in np.radians(np.asarray(angles_deg, np.float64)):
        c, s = np.cos(angle), np.sin(angle)
        v = pos[-2:] - origin
        rotated = v * c + np.cross(axis, v) * s + np.outer(v @ axis, axis) * (1 - c)  # Rodrigues
        new = atoms.copy()
        new.calc = None
        p = pos.copy()
        p[-2:] = origin + rotated
        new.set_positions(p)
        out.append(new)
    return out


def rigid_scan(frames) -> list:
    """The twist scan ``frames`` (ase Atoms with info ``n_carbon``, ``twist`` and energies) rebuilt
    from each chain length's φ = 0 frame by :func:`rigid_twist` to every scanned angle, labelled with
    the scan energy of that angle (``info["energy"]``). Only the far CH2 orientation changes between
    frames of one length, so only a model that passes orientations can fit these energies."""
    zero = {int(a.info["n_carbon"]): a for a in frames if float(a.info["twist"]) == 0.0}
    out = []
    for atoms in frames:
        n = int(atoms.info["n_carbon"])
        if n not in zero:
            raise ValueError(f"the scan has no twist = 0 frame for n_carbon = {n}")
        new = rigid_twist(zero[n], [float(atoms.info["twist"])])[0]
        new.info = {"n_carbon": n, "twist": float(atoms.info["twist"]), "energy": atoms.get_potential_energy()}
        out.append(new)
    return out


def plot_twist_curves(curves: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]], out_png: Path,
                      cutoff: Optional[float] = None, cc_dist: Optional[Mapping[int, float]] = None,
                      title: Optional[str] = None) -> Path:
    """One subplot per chain length: reference twist curve (black; left out where ``ref`` is NaN) and
    every model's prediction.

    ``curves``: {model name: :func:`twist_curves` output}; ``cc_dist``: terminal C···C per n (Å),
    shown in the subplot titles together with ``cutoff``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for c in curves.values() for n in c})
    cols = min(len(lengths), 3)
    rows = (len(lengths) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, n in zip(axes.flat, lengths):
        ref = next(c[n] for c in curves.values() if n in c)
        if np.isfinite(ref["ref"]).any():
            ax.plot(ref["twist"], ref["ref"], "k-", lw=2.2, label="GFN2-xTB")
        for name, c in curves.items():
            if n in c:
                ax.plot(c[n]["twist"], c[n]["pred"], "o-", ms=3, lw=1.2, label=name)
        label = f"n = {n} (C$_{{{n}}}$H$_4$)"
        if cc_dist is not None and n in cc_dist:
            label += f", C···C {cc_dist[n]:.1f} Å"
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("twist (degrees)")
        ax.set_ylabel("E(twist) − E(0) (meV)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(lengths):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    heading = title or "cumulene twist curves"
    if cutoff is not None:
        heading += f" (cutoff {cutoff:g} Å)"
    fig.suptitle(heading)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
