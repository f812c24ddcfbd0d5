"""Evaluation of a trained potential: per-structure predictions and errors on a data module's test
sets, metrics in meV, and the metrics table printed by the command-line tools."""
import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

log = logging.getLogger("pyg_equireann.evaluation")


def load_checkpoint(ckpt_path: str, float64: bool = False):
    """The :class:`~pyg_equireann.training.module.PotentialModule` of a training checkpoint (EMA weights), read
    safely (``weights_only=True``, allowed model classes only), in float64 or float32 as the data."""
    from pyg_equireann.training.module import PotentialModule

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

    known = module.model.known_elements()
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


def metrics_table(metrics: Dict[str, float]) -> str:
    from pyg_equireann.training.module import UNITS

    lines = ["| metric | value | unit |", "|---|---|---|"]
    for key, value in metrics.items():
        unit = next((u for k, u in UNITS.items() if key.endswith(k)), "")
        lines.append(f"| {key} | {value:.3f} | {unit} |")
    return "\n".join(lines)
