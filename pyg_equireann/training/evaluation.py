"""Evaluation of a trained potential: errors and their metrics (MAE/RMSE in meV), accumulated the same
way by :class:`~pyg_equireann.training.module.PotentialModule` (validation, test) and ``equireann-eval``
(which adds per-structure rows, ``errors.csv`` and parity plots), and the metrics table of the CLIs."""
import csv
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

#: units of the metrics (keys end with these names)
UNITS = {"energy_mae": "meV", "energy_rmse": "meV", "energy_per_atom_mae": "meV/atom",
         "energy_per_atom_rmse": "meV/atom", "forces_mae": "meV/Å", "forces_rmse": "meV/Å",
         "stress_mae": "meV/Å³", "stress_rmse": "meV/Å³"}


def batch_errors(batch, out: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Prediction − reference for a batch of B structures and N atoms: ``energy`` (B,) eV, ``energy_per_atom``
    (B,) eV/atom and, where the batch has them, ``forces`` (N, 3) eV/Å and ``stress`` (B, 3, 3) eV/Å³."""
    energy = out["energy"]
    num_atoms = torch.zeros_like(energy).index_add_(0, batch.batch, torch.ones_like(batch.batch, dtype=energy.dtype))
    energy_error = out["energy"] - batch.energy.view(-1)
    errors = {"energy": energy_error, "energy_per_atom": energy_error / num_atoms}
    if getattr(batch, "forces", None) is not None:
        errors["forces"] = out["forces"] - batch.forces
    if "stress" in out and getattr(batch, "stress", None) is not None:
        errors["stress"] = out["stress"] - batch.stress.view(-1, 3, 3)
    return errors


def _identity(t: Tensor) -> Tensor:
    return t


class ErrorAccumulator:
    """Sums of absolute and squared errors and their count (float64) per quantity."""

    def __init__(self):
        self.sums: Dict[str, Tensor] = {}

    def update(self, errors: Mapping[str, Tensor]) -> None:
        for name, error in errors.items():
            error = error.detach().double().flatten()
            s = torch.stack([error.abs().sum(), error.square().sum(),
                             torch.tensor(float(error.numel()), dtype=torch.float64, device=error.device)])
            self.sums[name] = self.sums[name] + s if name in self.sums else s

    def compute(self, reduce: Callable[[Tensor], Tensor] = _identity) -> Dict[str, float]:
        """``<quantity>_mae`` and ``<quantity>_rmse`` in meV (:data:`UNITS`) of the quantities with errors;
        ``reduce`` sums each (3,) tensor of sums over processes (DDP)."""
        out = {}
        for name, s in self.sums.items():
            s = reduce(s)
            if s[2] > 0:
                out[f"{name}_mae"] = float(s[0] / s[2]) * 1e3
                out[f"{name}_rmse"] = float((s[1] / s[2]).sqrt()) * 1e3
        return out


class ErrorMetrics:
    """The metrics of one data set: errors of all its structures, those of each config type of
    ``config_types`` (``batch.config_type`` indexes it) and, if given, the mean loss per structure."""

    def __init__(self, config_types: Sequence[str] = ()):
        self.total = ErrorAccumulator()
        self.by_type = {name: ErrorAccumulator() for name in config_types}
        self.loss_sums: Optional[List[float]] = None  # [Σ loss · B, Σ B]

    def update(self, batch, errors: Mapping[str, Tensor], loss: Optional[Tensor] = None) -> None:
        self.total.update(errors)
        if loss is not None:
            self.loss_sums = self.loss_sums or [0.0, 0.0]
            self.loss_sums[0] += float(loss) * int(batch.num_graphs)
            self.loss_sums[1] += int(batch.num_graphs)
        if self.by_type and getattr(batch, "config_type", None) is not None:
            # every type is updated (with no errors when absent from the batch), so that all DDP ranks hold
            # the same sums to reduce; types without structures are not reported
            graph_type = batch.config_type.view(-1)
            atom_type = graph_type[batch.batch]
            for t, acc in enumerate(self.by_type.values()):
                acc.update({name: error[atom_type == t] if name == "forces" else error[graph_type == t]
                            for name, error in errors.items()})

    def compute(self, reduce: Callable[[Tensor], Tensor] = _identity) -> Dict[str, float]:
        """``<metric>``, ``loss`` (if updated with one) and ``config_type=<type>/<metric>``."""
        out = self.total.compute(reduce)
        if self.loss_sums is not None:
            total = reduce(torch.tensor(self.loss_sums, dtype=torch.float64))
            out["loss"] = float(total[0] / total[1])
        for type_name, acc in self.by_type.items():
            out.update({f"config_type={type_name}/{k}": v for k, v in acc.compute(reduce).items()})
        return out


def load_checkpoint(ckpt_path: str, float64: Optional[bool] = False):
    """The :class:`~pyg_equireann.training.module.PotentialModule` of a training checkpoint (EMA weights), read
    safely (``weights_only=True``, allowed model classes only), in eval mode, in float64, float32 or (``None``)
    the checkpoint's own dtype."""
    from pyg_equireann.training.module import PotentialModule

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    module = PotentialModule.from_checkpoint(str(path))
    module.eval()
    if float64 is None:
        return module
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


def evaluate(module, loader: Iterable, name: str, metrics: Optional[ErrorMetrics] = None) -> Dict[str, np.ndarray]:
    """Per structure: ``idx`` (frame in its file), ``natoms``, ``config_type`` (index, -1 without),
    energies (eV), force MAE/RMSE (eV/Å); all force components as ``forces_ref``/``forces_pred``.
    The errors of every batch are also added to ``metrics``."""
    rows = {k: [] for k in ("idx", "natoms", "config_type", "energy_ref", "energy_pred", "forces_mae", "forces_rmse")}
    forces_ref, forces_pred = [], []
    for batch in tqdm(loader, desc=f"evaluating {name}", leave=False, disable=None):  # None: only in a terminal
        with torch.enable_grad():
            out = module.predict_batch(batch, create_graph=False)
        errors = batch_errors(batch, out)
        if metrics is not None:
            metrics.update(batch, errors)
        natoms = torch.bincount(batch.batch, minlength=batch.num_graphs)
        rows["idx"].append(batch.idx.view(-1))
        rows["natoms"].append(natoms)
        config_type = getattr(batch, "config_type", None)
        rows["config_type"].append(config_type.view(-1) if config_type is not None else
                                   torch.full((batch.num_graphs,), -1, dtype=torch.long))
        rows["energy_ref"].append(batch.energy.view(-1))
        rows["energy_pred"].append(out["energy"].detach())
        if "forces" in errors:
            err = errors["forces"].detach().double()
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


def evaluate_sets(module, loaders: Mapping[str, Iterable], config_types: Optional[Mapping[str, Sequence[str]]] = None
                  ) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, float]]:
    """Per-structure results (:func:`evaluate`) of each named test set and its metrics, ``<set>/<metric>``
    and, for the sets of ``config_types`` (``{set: type names}``), ``<set>/config_type=<type>/<metric>``."""
    results, metrics = {}, {}
    for name, loader in loaders.items():
        acc = ErrorMetrics((config_types or {}).get(name, ()))
        results[name] = evaluate(module, loader, name, acc)
        metrics.update({f"{name}/{k}": v for k, v in acc.compute().items()})
    return results, metrics


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


def write_errors_csv(results: Mapping[str, Mapping[str, np.ndarray]], type_names: Mapping[str, Sequence[str]],
                     path: Path) -> Path:
    """One row per structure of :func:`evaluate_sets`' results; ``type_names``: config type names of each set."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "frame", "config_type", "natoms", "energy_ref_eV", "energy_pred_eV", "energy_error_meV",
                         "energy_error_meV_per_atom", "forces_mae_meV_per_A", "forces_rmse_meV_per_A"])
        for name, r in results.items():
            names = type_names.get(name) or []
            for k in range(len(r["idx"])):
                err = (r["energy_pred"][k] - r["energy_ref"][k]) * 1e3
                fm = r["forces_mae"][k] * 1e3 if r["forces_mae"] is not None else ""
                fr = r["forces_rmse"][k] * 1e3 if r["forces_rmse"] is not None else ""
                t = int(r["config_type"][k])
                writer.writerow([name, int(r["idx"][k]), names[t] if 0 <= t < len(names) else "", int(r["natoms"][k]),
                                 f"{r['energy_ref'][k]:.8f}", f"{r['energy_pred'][k]:.8f}", f"{err:.4f}",
                                 f"{err / r['natoms'][k]:.4f}", fm, fr])
    return Path(path)


def run_evaluation(cfg: DictConfig, out_dir: Path) -> Dict[str, float]:
    """``equireann-eval``: evaluate ``cfg.ckpt_path`` on the test sets of ``cfg.data``, write ``metrics.json``,
    ``parity.png`` and ``errors.csv`` into ``out_dir``, print the metrics table; returns the metrics."""
    from pyg_equireann.training.plots import parity

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    module = load_checkpoint(cfg.ckpt_path, cfg.float64)
    datamodule = eval_datamodule(cfg.data)
    check_elements(module, datamodule, cfg.ckpt_path)
    loaders = dict(zip(datamodule.test_names, datamodule.test_dataloader()))
    results, metrics = evaluate_sets(module, loaders, getattr(datamodule, "test_config_types", None))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    parity(results, out_dir / "parity.png")
    type_names = {name: (getattr(ds, "meta", None) or {}).get("config_types") or []
                  for name, ds in datamodule.test_datasets.items()}
    write_errors_csv(results, type_names, out_dir / "errors.csv")
    print(f"{type(module.model).__name__} from {cfg.ckpt_path}")
    print(metrics_table(metrics))
    print(f"written: {out_dir / 'metrics.json'}, {out_dir / 'parity.png'}, {out_dir / 'errors.csv'}")
    return metrics


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A Markdown table of ``metrics`` with their units."""
    lines = ["| metric | value | unit |", "|---|---|---|"]
    for key, value in metrics.items():
        unit = next((u for k, u in UNITS.items() if key.endswith(k)), "")
        lines.append(f"| {key} | {value:.3f} | {unit} |")
    return "\n".join(lines)
