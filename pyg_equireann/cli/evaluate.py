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
from typing import Dict, List

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import check_writable, hydra_entry, user_errors
from pyg_equireann.training.plots import parity
from pyg_equireann.training.evaluation import check_elements, eval_datamodule, evaluate, load_checkpoint, metrics_table, summarize

log = logging.getLogger("equireann-eval")


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
