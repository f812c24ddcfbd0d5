"""The cumulene twist benchmark of ``equireann-nonlocal`` (``conf/nonlocal.yaml``, docs/nonlocal.md).

Every model of ``cfg.models`` (those named in ``cfg.run``) is trained on the cumulene data with the same
short cutoff, data, loss, optimiser and budget (equal CPU time per model) by the equal-budget harness
(:func:`pyg_equireann.experiments.harness.train_models`, in process, one shared data module); its best
(EMA) checkpoint is then evaluated. The run folder gets one subfolder per model (checkpoints, logs,
``predictions.npz``, ``summary.json``) and the report over all model subfolders present:

* ``report.md``: tables and target checks; ``per_length.csv``: energy/force test MAE and
  twist-resolved MAE per model and chain length; ``twist_curves.csv``: every predicted curve;
* ``twist_curves.png``: predicted vs reference twist curves, one subplot per chain length;
* ``rigid_twist.png``: the same on rigidly twisted chains (only the last CH2 moves), where models
  with invariant messages must be exactly flat.

Model names in the report are ``cfg.labels[<model>]``; the twist-MAE ratios of every model in
``cfg.compare`` to every other model are listed as targets.
"""
import csv
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pyg_equireann.experiments.cumulene import (frame_info, plot_twist_curves, rigid_twist, twist_captured,
                                                twist_curves, twist_mae, twist_mae_centered)
from pyg_equireann.experiments.harness import train_models
from pyg_equireann.training.evaluation import evaluate, load_checkpoint
from pyg_equireann.training.prepare import prepare_model_config

log = logging.getLogger("equireann-nonlocal")

#: top-level keys of conf/nonlocal.yaml that configure the experiment, not a training run
EXPERIMENT_KEYS = ("models", "run", "labels", "compare", "rigid_twist_angles")


def _model_cfg(cfg: DictConfig, name: str) -> DictConfig:
    if name not in cfg.models:
        raise KeyError(f"run lists model {name!r}, which is not in models ({', '.join(cfg.models)})")
    model_cfg = cfg.models[name]
    if "_target_" not in model_cfg:
        raise KeyError(f"models.{name} has no _target_ (is conf/model/{name}.yaml missing?)")
    return model_cfg


def run_config(cfg: DictConfig, name: str) -> DictConfig:
    """The train config of model ``name``: ``cfg`` (resolved) with ``model = cfg.models[name]``."""
    _model_cfg(cfg, name)
    job = OmegaConf.to_container(cfg, resolve=True)
    job["model"] = job["models"][name]
    return OmegaConf.create({k: v for k, v in job.items() if k not in EXPERIMENT_KEYS})


def predictions(cfg: DictConfig, datamodule, checkpoint: str) -> Dict[str, np.ndarray]:
    """Per-structure test-set predictions (``<test set>/{idx,natoms,energy_ref,energy_pred,forces_mae}``) and
    rigid-twist energies (``rigid/<n>``) of the model in ``checkpoint``."""
    if not checkpoint:
        raise ValueError("equireann-nonlocal evaluates the best checkpoint: keep callbacks.checkpoint")
    module = load_checkpoint(checkpoint, cfg.float64)
    arrays = {}
    for test_name, loader in zip(datamodule.test_names, datamodule.test_dataloader()):
        r = evaluate(module, loader, test_name)
        for key in ("idx", "natoms", "energy_ref", "energy_pred", "forces_mae"):
            if r[key] is not None:
                arrays[f"{test_name}/{key}"] = r[key]
    arrays.update(rigid_twist_predictions(module, datamodule.test_files["scan"]["path"], cfg.rigid_twist_angles,
                                          datamodule.cutoff))
    return arrays


def rigid_twist_predictions(module, scan_file: Path, angles, cutoff: float) -> Dict[str, np.ndarray]:
    """Energies (eV) of the twist = 0 chains of ``scan_file`` with the last CH2 rotated rigidly by each
    of ``angles`` (degrees): ``{"rigid/<n>": (len(angles),)}`` per chain length n."""
    import ase.io
    from torch_geometric.data import Batch

    from pyg_equireann.datamodules.structures import atoms_to_data, attach_edges

    frames = [a for a in ase.io.read(str(scan_file), index=":") if float(a.info["twist"]) == 0.0]
    dtype = next(module.parameters()).dtype
    out = {}
    for atoms in frames:
        structures = rigid_twist(atoms, angles)
        for s in structures:
            s.info["energy"] = 0.0
        data = [atoms_to_data(s, k, "rigid twist", dtype, "energy", None, None) for k, s in enumerate(structures)]
        attach_edges(data, float(cutoff), progress=False)
        batch = Batch.from_data_list(data)
        with torch.enable_grad():
            energy = module.predict_batch(batch, create_graph=False)["energy"].detach().double().numpy()
        out[f"rigid/{int(atoms.info['n_carbon'])}"] = energy
    return out


def label(cfg: DictConfig, name: str) -> str:
    """The report's name of model ``name`` (``cfg.labels``; the config key if it has none)."""
    return str((cfg.get("labels") or {}).get(name, name))


def _fmt(value: float) -> str:
    return f"{value:.1f}" if np.isfinite(value) else "–"


def length_transfer(cfg: DictConfig, run_dir: Path, names: List[str], rigid_file: Optional[Path],
                    long_file: Optional[Path]) -> List[str]:
    """The report's length-transfer section (and ``length_transfer.csv``, ``rigid_xtb_twist.png``): per chain
    length, on the GFN2-xTB rigid twists of ``rigid_file`` (test set ``rigid_xtb``) the twist MAE, its
    mean-referenced version and the fraction of the twist captured, against a twist-blind (flat) prediction; on the
    long-chain MD frames of ``long_file`` (test set ``long``) the energy and force MAE. Empty without the files."""
    if rigid_file is None or not Path(rigid_file).is_file():
        return []
    info = frame_info(rigid_file, ("n_carbon", "twist", "cc_dist"))
    cc = {int(n): float(d) for n, d in zip(info["n_carbon"], info["cc_dist"])}
    reach = (int(cfg.num_iterations) + 1) * float(cfg.cutoff)
    trained = sorted(set(int(n) for n in frame_info(cfg.data.get("train_file") or Path(rigid_file).parent
                                                    / "cumulene_train.xyz", ("n_carbon",))["n_carbon"]))
    long_info = frame_info(long_file, ("n_carbon",)) if long_file is not None and Path(long_file).is_file() else None
    rows, curves = [], {}
    for name in names:
        p = np.load(run_dir / name / "predictions.npz")
        if "rigid_xtb/energy_pred" not in p.files:
            continue
        idx = p["rigid_xtb/idx"].astype(int)
        curves[name] = twist_curves(p["rigid_xtb/energy_pred"], p["rigid_xtb/energy_ref"], info["n_carbon"][idx],
                                    info["twist"][idx])
        mae, centered = twist_mae(curves[name]), twist_mae_centered(curves[name])
        long_err = {}
        if long_info is not None and "long/energy_pred" in p.files:
            k_long = p["long/idx"].astype(int)
            n_long = long_info["n_carbon"][k_long]
            e_err = np.abs(p["long/energy_pred"] - p["long/energy_ref"]) * 1e3
            long_err = {int(n): (float(e_err[n_long == n].mean()), float(p["long/forces_mae"][n_long == n].mean() * 1e3))
                        for n in set(n_long.tolist())}
        for n, c in curves[name].items():
            ref_c = c["ref"] - c["ref"].mean()
            rows.append({"model": name, "n_carbon": n, "cc_dist": cc[n], "in_training": n in trained,
                         "beyond_reach": cc[n] > reach, "rigid_twist_mae_meV": mae[n],
                         "rigid_twist_mae_centered_meV": centered[n],
                         "flat_mae_meV": float(np.abs(c["ref"]).mean()),
                         "flat_mae_centered_meV": float(np.abs(ref_c).mean()),
                         "captured": twist_captured(c["pred"], c["ref"]),
                         "long_energy_mae_meV": long_err.get(n, (float("nan"),) * 2)[0],
                         "long_forces_mae_meV_per_A": long_err.get(n, (float("nan"),) * 2)[1]})
    if not rows:
        return []
    with open(run_dir / "length_transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_twist_curves({label(cfg, n): c for n, c in curves.items()}, run_dir / "rigid_xtb_twist.png",
                      float(cfg.cutoff), cc, "Rigid twist of the last CH$_2$, GFN2-xTB")
    by = {(r["model"], r["n_carbon"]): r for r in rows}
    lengths = sorted({r["n_carbon"] for r in rows})
    models = [n for n in names if n in curves]

    def table(key, fmt=_fmt):
        lines = ["| model | " + " | ".join(f"{n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        first = models[0]
        if key in ("rigid_twist_mae_meV", "rigid_twist_mae_centered_meV"):
            flat_key = "flat_mae_meV" if key == "rigid_twist_mae_meV" else "flat_mae_centered_meV"
            lines.append("| twist-blind (flat) | " + " | ".join(_fmt(by[(first, n)][flat_key]) for n in lengths) + " |")
        for name in models:
            lines.append(f"| {label(cfg, name)} | " + " | ".join(
                fmt(by[(name, n)][key]) if (name, n) in by else "–" for n in lengths) + " |")
        return lines

    percent = (lambda v: f"{100 * v:.0f} %" if np.isfinite(v) else "–")
    new = [n for n in lengths if n not in trained]
    far = [n for n in lengths if cc[n] > reach]
    md = ["", "## Length transfer and reach: rigid twists with GFN2-xTB labels", "",
          f"Chains of n = {lengths[0]}–{lengths[-1]} carbons (columns), the last CH2 rotated rigidly (0–90°) on the "
          f"relaxed twist-0 chain, labelled with their own GFN2-xTB energies (`{Path(rigid_file).name}`). Trained on "
          f"n = {trained[0]}–{trained[-1]}; new lengths: n = {', '.join(map(str, new)) or 'none'}. Ends farther apart "
          f"than (num_iterations + 1) × cutoff = {reach:g} Å: n = {', '.join(map(str, far)) or 'none'}.", "",
          "Terminal C···C (Å): " + ", ".join(f"{n}: {cc[n]:.1f}" for n in lengths), "",
          "### Fraction of the twist captured (least-squares factor, 1 = the whole curve, 0 = flat)", ""]
    md += table("captured", percent)
    md += ["", "### Twist MAE, ΔE(φ) = E(φ) − E(0) (meV)", ""] + table("rigid_twist_mae_meV")
    md += ["", "### Mean-referenced twist MAE (meV)", ""] + table("rigid_twist_mae_centered_meV")
    if long_info is not None:
        md += ["", f"### Long-chain MD frames (`{Path(long_file).name}`): energy MAE (meV)", ""]
        md += table("long_energy_mae_meV")
        md += ["", "### Long-chain MD frames: force MAE (meV/Å)", ""] + table("long_forces_mae_meV_per_A")
    md += ["", "### Targets", ""]
    for name in models:
        if new:
            ratio = np.mean([by[(name, n)]["rigid_twist_mae_meV"] for n in new]) / np.mean(
                [by[(name, n)]["flat_mae_meV"] for n in new])
            ratio_c = np.mean([by[(name, n)]["rigid_twist_mae_centered_meV"] for n in new]) / np.mean(
                [by[(name, n)]["flat_mae_centered_meV"] for n in new])
            md.append(f"- {label(cfg, name)}: new lengths, twist MAE ÷ twist-blind {ratio:.3f} "
                      f"(mean-referenced {ratio_c:.3f}; target ≤ 0.5)")
        if far:
            captured = np.mean([by[(name, n)]["captured"] for n in far])
            md.append(f"- {label(cfg, name)}: beyond {reach:g} Å, mean fraction captured {100 * captured:.0f} % "
                      "(target ≥ 50 %)")
    md += ["", "![rigid twist, GFN2-xTB](rigid_xtb_twist.png)"]
    return md


def write_report(cfg: DictConfig, run_dir: Path, order: List[str], test_file: Path, scan_file: Path,
                 rigid_file: Optional[Path] = None, long_file: Optional[Path] = None) -> Path:
    """Tables (Markdown, CSV) and plots from every ``<run_dir>/<model>/predictions.npz``; chain lengths
    and twist angles from the extxyz info of ``test_file`` and ``scan_file`` (and of the length-transfer
    test sets ``rigid_file``, ``long_file`` when given: :func:`length_transfer`)."""
    names = [n for n in order if (run_dir / n / "predictions.npz").is_file()]
    names += sorted(p.parent.name for p in run_dir.glob("*/predictions.npz") if p.parent.name not in names)
    if not names:
        raise FileNotFoundError(f"{run_dir}: no <model>/predictions.npz to report on")
    test_info = frame_info(test_file, ("n_carbon",))
    scan_info = frame_info(scan_file, ("n_carbon", "twist", "cc_dist"))
    cc = {int(n): float(d) for n, d in zip(scan_info["n_carbon"], scan_info["cc_dist"])}
    cutoff = float(cfg.cutoff)
    nonlocal_lengths = sorted(n for n, d in cc.items() if d > cutoff)
    summaries, curves, rigid, rows = {}, {}, {}, []
    for name in names:
        p = np.load(run_dir / name / "predictions.npz")
        summaries[name] = json.loads((run_dir / name / "summary.json").read_text())
        idx = p["scan/idx"].astype(int)
        curves[name] = twist_curves(p["scan/energy_pred"], p["scan/energy_ref"], scan_info["n_carbon"][idx],
                                    scan_info["twist"][idx])
        rigid[name] = {int(k.split("/")[1]): (p[k] - p[k][0]) * 1e3 for k in p.files if k.startswith("rigid/")}
        twist_err = twist_mae(curves[name])
        centered_err = twist_mae_centered(curves[name])
        angles = np.asarray(cfg.rigid_twist_angles, np.float64)
        captured = {n: twist_captured(e, np.interp(angles, curves[name][n]["twist"], curves[name][n]["ref"]))
                    for n, e in rigid[name].items() if n in curves[name]}
        idx = p["test/idx"].astype(int)
        n_test = test_info["n_carbon"][idx]
        e_err = np.abs(p["test/energy_pred"] - p["test/energy_ref"]) * 1e3
        for n in sorted(set(int(v) for v in n_test)):
            k = n_test == n
            rows.append({"model": name, "n_carbon": n, "energy_mae_meV": float(e_err[k].mean()),
                         "energy_per_atom_mae_meV": float((e_err[k] / p["test/natoms"][k]).mean()),
                         "forces_mae_meV_per_A": float(p["test/forces_mae"][k].mean() * 1e3),
                         "twist_mae_meV": twist_err.get(n, float("nan")),
                         "twist_mae_centered_meV": centered_err.get(n, float("nan")),
                         "rigid_twist_captured": captured.get(n, float("nan")),
                         "twist_pred_range_meV": float(np.ptp(curves[name][n]["pred"])) if n in curves[name] else float("nan"),
                         "twist_ref_range_meV": float(np.ptp(curves[name][n]["ref"])) if n in curves[name] else float("nan"),
                         "rigid_twist_range_meV": float(np.ptp(rigid[name][n])) if n in rigid[name] else float("nan")})
        summaries[name]["test_energy_mae_meV"] = float(e_err.mean())
        summaries[name]["test_forces_mae_meV_per_A"] = float(
            np.average(p["test/forces_mae"], weights=p["test/natoms"]) * 1e3)
        summaries[name]["twist_mae_nonlocal_meV"] = float(np.mean([twist_err[n] for n in nonlocal_lengths])) \
            if nonlocal_lengths else float("nan")
        summaries[name]["twist_mae_centered_nonlocal_meV"] = float(
            np.mean([centered_err[n] for n in nonlocal_lengths])) if nonlocal_lengths else float("nan")

    with open(run_dir / "per_length.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(run_dir / "twist_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "n_carbon", "twist_deg", "dE_ref_meV", "dE_pred_meV"])
        for name, c in curves.items():
            for n, curve in c.items():
                for t, r, q in zip(curve["twist"], curve["ref"], curve["pred"]):
                    writer.writerow([name, n, f"{t:.2f}", f"{r:.3f}", f"{q:.3f}"])
    labelled = {label(cfg, n): curves[n] for n in names}
    plot_twist_curves(labelled, run_dir / "twist_curves.png", cutoff, cc, "Cumulene twist, relaxed scan")
    angles = np.asarray(cfg.rigid_twist_angles, np.float64)
    rigid_curves = {label(cfg, n): {m: {"twist": angles, "ref": np.full_like(angles, np.nan), "pred": e}
                                    for m, e in rigid[n].items()} for n in names}
    plot_twist_curves(rigid_curves, run_dir / "rigid_twist.png", cutoff, cc,
                      "Rigid twist of the last CH$_2$ (no reference)")

    lengths = sorted({r["n_carbon"] for r in rows})
    scan_lengths = sorted({n for c in curves.values() for n in c})
    md = [f"# Cumulene twist benchmark (cutoff {cutoff:g} Å, {cfg.num_iterations} iterations/layers)", ""]
    md += [f"Run folder `{run_dir}`; data `{Path(scan_file).parent}`; seed {cfg.seed}. "
           f"Chains whose terminal C···C exceeds the cutoff: n = {', '.join(map(str, nonlocal_lengths))}.", ""]
    md += ["## Models and budget", "", "| model | parameters | epochs | training wall (s) | training CPU (s) "
           "| test energy MAE (meV) | test force MAE (meV/Å) | twist MAE, C···C > cutoff (meV) |",
           "|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = summaries[n]
        md.append(f"| {label(cfg, n)} | {s['parameters']:,} | {s['epochs']} | {s['train_wall_s']:.0f} | "
                  f"{s['train_cpu_s']:.0f} | {_fmt(s['test_energy_mae_meV'])} | "
                  f"{_fmt(s['test_forces_mae_meV_per_A'])} | {_fmt(s['twist_mae_nonlocal_meV'])} |")
    by = {(r["model"], r["n_carbon"]): r for r in rows}

    def table(title, key, ns, note="", fmt=_fmt):
        lines = ["", f"## {title}", ""] + ([note, ""] if note else [])
        lines += ["| model | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for name in names:
            lines.append(f"| {label(cfg, name)} | " + " | ".join(
                fmt(by[(name, n)][key]) if (name, n) in by else "–" for n in ns) + " |")
        return lines

    md += table("Test set: energy MAE per chain length (meV)", "energy_mae_meV", lengths)
    md += table("Test set: force MAE per chain length (meV/Å)", "forces_mae_meV_per_A", lengths)
    md += table("Twist-resolved energy MAE (meV)", "twist_mae_meV", scan_lengths,
                "Mean over the clean scan (0–90°, 5° steps) of |ΔE_pred(φ) − ΔE_ref(φ)|, ΔE(φ) = E(φ) − E(0).")
    md += table("Mean-referenced twist MAE (meV)", "twist_mae_centered_meV", scan_lengths,
                "Mean over the scan of |(E_pred − ⟨E_pred⟩) − (E_ref − ⟨E_ref⟩)|, ⟨·⟩ the mean over the twist: "
                "no single reference angle (a flat prediction scores the mean |E_ref − ⟨E_ref⟩|).")
    md += ["", "Reference twist range max−min ΔE (meV): " + ", ".join(
        f"n = {n}: {np.ptp(curves[names[0]][n]['ref']):.0f}" for n in scan_lengths)]
    md += table("Predicted twist range on the relaxed scan, max − min ΔE_pred (meV)", "twist_pred_range_meV",
                scan_lengths)
    md += table("Rigid twist: predicted range max − min (meV)", "rigid_twist_range_meV", scan_lengths,
                "The twist = 0 chain with only the last CH2 rotated (bond lengths and angles fixed). With no "
                "atom seeing both ends, a model with invariant messages must give 0 here; on the relaxed scan "
                "it can still vary through the bond lengths, which change with the twist.")
    md += table("Rigid twist: fraction of the reference twist captured", "rigid_twist_captured", scan_lengths,
                "Least-squares factor a of E_rigid(φ) − ⟨E_rigid⟩ ≈ a (E_ref(φ) − ⟨E_ref⟩), the reference being "
                "the relaxed scan at the same angles: 1 the whole curve, 0 flat, < 0 the wrong sign.",
                fmt=lambda v: f"{100 * v:.0f} %" if np.isfinite(v) else "–")
    ours = [n for n in (cfg.get("compare") or []) if n in names]
    if ours and nonlocal_lengths:
        md += ["", "## Targets (chains with C···C > cutoff)", ""]
        for mine in ours:
            value = summaries[mine]["twist_mae_nonlocal_meV"]
            for other in [n for n in names if n not in ours]:
                theirs = summaries[other]["twist_mae_nonlocal_meV"]
                centered = (summaries[mine]["twist_mae_centered_nonlocal_meV"]
                            / summaries[other]["twist_mae_centered_nonlocal_meV"])
                md.append(f"- {label(cfg, mine)} / {label(cfg, other)} twist MAE ratio: {value / theirs:.3f} "
                          f"({value:.1f} vs {theirs:.1f} meV; mean-referenced: {centered:.3f})")
    skipped_file = run_dir / "skipped.json"
    if skipped_file.is_file():
        md += ["", "Not run: " + "; ".join(f"{label(cfg, k)} ({v})" for k, v in json.loads(skipped_file.read_text()).items()
                                           if k not in names)]
    md += ["", "![twist curves](twist_curves.png)", "", "![rigid twist](rigid_twist.png)", ""]
    md += length_transfer(cfg, run_dir, names, rigid_file, long_file)
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    return run_dir / "report.md"


def run_nonlocal(cfg: DictConfig, run_dir: Path) -> Path:
    """Train the models of ``cfg.run`` (all of ``cfg.models`` if null) into ``run_dir/<model>``, write their
    predictions and the report over every model folder of ``run_dir``; returns the report's path."""
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    names = list(cfg.models) if cfg.get("run") is None else list(cfg.run)
    for name in names:
        _model_cfg(cfg, name)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    log.info("%s", datamodule.summary())
    skipped = {}
    for name in names:
        try:
            instantiate(prepare_model_config(cfg.models[name], datamodule))
        except ImportError as err:  # an optional extra (MACE) that is not installed
            log.warning("skipping %s: %s", label(cfg, name), err)
            skipped[name] = str(err).splitlines()[0]
    if skipped:
        (run_dir / "skipped.json").write_text(json.dumps(skipped, indent=2))
    runs = {name: run_config(cfg, name) for name in names if name not in skipped}
    results = train_models(runs, run_dir, datamodule=datamodule, progress=False)
    for name, result in results.items():
        np.savez(run_dir / name / "predictions.npz", **predictions(cfg, datamodule, result["checkpoint"]))
        summary = {"model": name, "label": label(cfg, name), "parameters": result["parameters"],
                   "epochs": result["epochs"], "train_wall_s": result["fit_wall_seconds"],
                   "train_cpu_s": result["fit_cpu_seconds"], "checkpoint": result["checkpoint"]}
        (run_dir / name / "summary.json").write_text(json.dumps(summary, indent=2))
    extra = {k: datamodule.test_files[k]["path"] if k in datamodule.test_files else None for k in ("rigid_xtb", "long")}
    return write_report(cfg, run_dir, list(cfg.models), datamodule.test_files["test"]["path"],
                        datamodule.test_files["scan"]["path"], extra["rigid_xtb"], extra["long"])
