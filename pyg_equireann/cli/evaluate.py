"""``equireann-eval``: evaluate a checkpoint on a data module's test set(s).

Prints a metrics table and writes ``metrics.json``, ``parity.png`` (energy and force parity) and
``errors.csv`` (one row per structure) into ``<run>/eval/<data>_<time>/``. Test sets with several
config types (``data.config_type_key``) are also reported per type. Files alone need no training data:
``equireann-eval ckpt_path=<run>/checkpoints/best.ckpt data=xyz 'data.test_files=[a.xyz,b.xyz]'``.
"""
import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from . import check_writable, hydra_entry, user_errors
from .plots import parity
from .train import metrics_table

log = logging.getLogger("equireann-eval")


def load_checkpoint(ckpt_path: str, float64: bool = False):
    """The :class:`~pyg_equireann.lightning.PotentialModule` of a training checkpoint (EMA weights), read
    safely (``weights_only=True``, allowed model classes only), in float64 or float32 as the data."""
    from ..lightning import PotentialModule

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    module = PotentialModule.from_checkpoint(str(path))
    module.eval()
    return module.double() if float64 else module.float()


def check_elements(module, datamodule, ckpt_path) -> None:
    """ValueError naming the test file, frame and element if a test set holds an element the model
    was not trained on."""
    from ase.data import chemical_symbols

    known = module.model.known_elements() if hasattr(module.model, "known_elements") else None
    if known is None:
        return
    for name, ds in datamodule.test_datasets.items():
        unknown = [z for z in ds.elements() if z not in known]
        if unknown:
            z = unknown[0]
            raise ValueError(
                f"test set {name!r} ({ds.source}) contains {', '.join(chemical_symbols[u] for u in unknown)} "
                f"(first {chemical_symbols[z]}, Z={z}, in frame {ds.first_frame_with(z)}), which the model of "
                f"{ckpt_path} was not trained on; it knows {[chemical_symbols[k] for k in known]}"
            )


def evaluate(module, loader, name: str) -> Dict[str, np.ndarray]:
    """Per structure: ``idx`` (frame in its file), ``natoms``, ``config_type`` (index, -1 without),
    energies (eV), force MAE/RMSE (eV/Å); all force components as ``forces_ref``/``forces_pred``."""
    rows = {k: [] for k in ("idx", "natoms", "config_type", "energy_ref", "energy_pred", "forces_mae", "forces_rmse")}
    forces_ref, forces_pred = [], []
    for batch in tqdm(loader, desc=f"evaluating {name}", leave=False):
        with torch.enable_grad():
            out = module.predict_batch(batch, create_graph=False)
        natoms = torch.bincount(batch.batch, minlength=batch.num_graphs)
        rows["idx"].append(batch.idx.view(-1))
        rows["natoms"].append(natoms)
        config_type = getattr(batch, "config_type", None)
        rows["config_type"].append(config_type.view(-1) if config_type is not None else
                                   torch.full((batch.num_graphs,), -1, dtype=torch.long))
        rows["energy_ref"].append(batch.energy.view(-1))
        rows["energy_pred"].append(out["energy"].detach())
        if getattr(batch, "forces", None) is not None:
            err = (out["forces"].detach() - batch.forces).double()
            rows["forces_mae"].append(torch.zeros(batch.num_graphs, dtype=torch.float64).index_add_(
                0, batch.batch, err.abs().sum(1)) / (3 * natoms))
            rows["forces_rmse"].append((torch.zeros(batch.num_graphs, dtype=torch.float64).index_add_(
                0, batch.batch, err.square().sum(1)) / (3 * natoms)).sqrt())
            forces_ref.append(batch.forces.flatten())
            forces_pred.append(out["forces"].detach().flatten())
    result = {k: torch.cat(v).double().numpy() if v else None for k, v in rows.items()}
    result["energy_ref_per_atom"] = result["energy_ref"] / result["natoms"]
    result["energy_pred_per_atom"] = result["energy_pred"] / result["natoms"]
    result["forces_ref"] = torch.cat(forces_ref).numpy() if forces_ref else None
    result["forces_pred"] = torch.cat(forces_pred).numpy() if forces_pred else None
    return result


def summarize(r: Dict[str, np.ndarray], mask: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Energy (meV, meV/atom) and force (meV/Å) MAE/RMSE of the structures selected by ``mask`` (all by default)."""
    mask = np.ones(len(r["idx"]), dtype=bool) if mask is None else mask
    e = (r["energy_pred"][mask] - r["energy_ref"][mask]) * 1e3
    natoms = r["natoms"][mask]
    out = {"energy_mae": float(np.abs(e).mean()), "energy_rmse": float(np.sqrt((e**2).mean())),
           "energy_per_atom_mae": float(np.abs(e / natoms).mean()),
           "energy_per_atom_rmse": float(np.sqrt(((e / natoms) ** 2).mean()))}
    if r["forces_ref"] is not None:
        atoms = np.repeat(mask, r["natoms"].astype(np.int64) * 3)  # mask over the flat force components
        f = (r["forces_pred"][atoms] - r["forces_ref"][atoms]) * 1e3
        out.update({"forces_mae": float(np.abs(f).mean()), "forces_rmse": float(np.sqrt((f**2).mean()))})
    return out


def eval_datamodule(data_cfg: DictConfig):
    """The data module of ``data_cfg`` set up for testing. A file data module (``data=xyz``) without
    ``train_file`` holds only its test files: the checkpoint carries E0 and the scaling."""
    from omegaconf import OmegaConf, open_dict

    if "train_file" in data_cfg.keys() and OmegaConf.is_missing(data_cfg, "train_file"):
        with open_dict(data_cfg):
            data_cfg.train_file = None
    datamodule = instantiate(data_cfg)  # its errors, wrapped by Hydra, become one line in user_errors
    datamodule.setup("test")
    if not datamodule.test_datasets:
        raise ValueError(f"the data config ({data_cfg.get('_target_')}) has no test set: give data.test_files "
                         "(data=xyz) or a test split")
    return datamodule


def _remove_if_unused(out_dir: Path) -> None:
    """Delete ``out_dir`` (and an emptied ``eval/`` above it) if it holds nothing but Hydra's records and
    logs, so that a failed evaluation leaves no empty result folder."""
    if not out_dir.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in out_dir.iterdir()):
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    parent = out_dir.parent
    if parent.name == "eval" and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def run(cfg: DictConfig) -> Dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on the test sets of ``cfg.data``; a failed call leaves no result folder."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return _run(cfg, out_dir)
    except BaseException:
        _remove_if_unused(out_dir)
        raise


def _run(cfg: DictConfig, out_dir: Path) -> Dict[str, float]:
    check_writable(out_dir, "eval folder")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    module = load_checkpoint(cfg.ckpt_path, cfg.float64)
    datamodule = eval_datamodule(cfg.data)
    check_elements(module, datamodule, cfg.ckpt_path)
    types: Dict[str, List[str]] = dict(getattr(datamodule, "test_config_types", None) or {})
    results, metrics = {}, {}
    for name, loader in zip(datamodule.test_names, datamodule.test_dataloader()):
        results[name] = evaluate(module, loader, name)
        metrics.update({f"{name}/{k}": v for k, v in summarize(results[name]).items()})
        for t, type_name in enumerate(types.get(name, [])):
            mask = results[name]["config_type"] == t
            if mask.any():
                metrics.update({f"{name}/config_type={type_name}/{k}": v
                                for k, v in summarize(results[name], mask).items()})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    parity(results, out_dir / "parity.png")
    with open(out_dir / "errors.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "frame", "config_type", "natoms", "energy_ref_eV", "energy_pred_eV", "energy_error_meV",
                         "energy_error_meV_per_atom", "forces_mae_meV_per_A", "forces_rmse_meV_per_A"])
        for name, r in results.items():
            names = (getattr(datamodule.test_datasets[name], "meta", None) or {}).get("config_types") or []
            for k in range(len(r["idx"])):
                err = (r["energy_pred"][k] - r["energy_ref"][k]) * 1e3
                fm = r["forces_mae"][k] * 1e3 if r["forces_mae"] is not None else ""
                fr = r["forces_rmse"][k] * 1e3 if r["forces_rmse"] is not None else ""
                t = int(r["config_type"][k])
                writer.writerow([name, int(r["idx"][k]), names[t] if 0 <= t < len(names) else "", int(r["natoms"][k]), f"{r['energy_ref'][k]:.8f}",
                                 f"{r['energy_pred'][k]:.8f}", f"{err:.4f}", f"{err / r['natoms'][k]:.4f}", fm, fr])
    print(f"{type(module.model).__name__} from {cfg.ckpt_path}")
    print(metrics_table(metrics))
    print(f"written: {out_dir / 'metrics.json'}, {out_dir / 'parity.png'}, {out_dir / 'errors.csv'}")
    return metrics


@hydra_entry("eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
