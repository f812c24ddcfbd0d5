"""``equireann-train``: train a potential with Lightning, configured by Hydra (``conf/train.yaml``).

Every run writes one folder (``runs/<model>_<data>/<time>/``): ``.hydra/`` (composed and resolved
config), ``config_resolved.yaml``, ``logs/metrics.csv`` (CSV log; ``logs_resumed_*`` after a resume), ``checkpoints/{best,last}.ckpt``,
``learning_curve.png``, ``train_summary.json`` (epochs, steps, parameters, training time, why it stopped),
``test_metrics.json``, ``train.log`` and ``run_info.json`` (package versions, git
commit, platform, torch settings; ``run_info_resumed_<time>.json`` for each resumption). Checkpoints are
written atomically (:class:`~pyg_equireann.checkpoint.AtomicCheckpointIO`).
"""
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.plugins import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from ..callbacks import EpochLog, TrainingBudget
from ..checkpoint import AtomicCheckpointIO
from . import check_writable, hydra_entry, user_errors
from .plots import learning_curve

log = logging.getLogger("equireann-train")


def prepare_model_config(model_cfg: DictConfig, datamodule) -> Dict[str, Any]:
    """Resolve ``auto`` entries (``elements``, ``avg_num_neighbors``) from the training data."""
    config = OmegaConf.to_container(model_cfg, resolve=True)
    if config.get("elements") == "auto":
        config["elements"] = list(datamodule.elements)
    if config.get("avg_num_neighbors") == "auto":
        config["avg_num_neighbors"] = float(datamodule.statistics["avg_num_neighbors"])
    return config


def metrics_table(metrics: Dict[str, float]) -> str:
    from ..lightning import UNITS

    lines = ["| metric | value | unit |", "|---|---|---|"]
    for key, value in metrics.items():
        unit = next((u for k, u in UNITS.items() if key.endswith(k)), "")
        lines.append(f"| {key} | {value:.3f} | {unit} |")
    return "\n".join(lines)


def write_run_info(out_dir: Path, cfg: DictConfig, trainer: L.Trainer) -> Path:
    """``run_info.json`` (``run_info_resumed_<time>.json`` when resuming): environment, seed, trainer flags."""
    from ..utils import environment_info

    now = datetime.datetime.now()
    resumed = cfg.get("ckpt_path") not in (None, "", "None", "null")
    info = {"time": now.isoformat(timespec="seconds"), "seed": cfg.get("seed"), "float64": cfg.get("float64"),
            "resumed_from": str(cfg.ckpt_path) if resumed else None, "config": "config_resolved.yaml",
            "trainer": {"deterministic": cfg.trainer.get("deterministic"), "precision": str(trainer.precision),
                        "accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size},
            **environment_info()}
    path = out_dir / (f"run_info_resumed_{now:%Y%m%d-%H%M%S}.json" if resumed else "run_info.json")
    path.write_text(json.dumps(info, indent=2))
    return path


def build_module(model_cfg: DictConfig, module_cfg: DictConfig, datamodule, float64: bool = False,
                 calibrate_densities: bool = True):
    """A :class:`~pyg_equireann.lightning.PotentialModule` for ``model_cfg`` with loss/optimiser settings
    ``module_cfg``, the energy statistics (E0, scale, shift) of the data module's training set and, for
    EquiREANN/REANN with ``calibrate_densities``, densities scaled to unit RMS on the first training structures."""
    from ..lightning import PotentialModule

    model_config = prepare_model_config(model_cfg, datamodule)
    module = PotentialModule(model=model_config, **OmegaConf.to_container(module_cfg, resolve=True))
    stats = datamodule.statistics
    module.model.set_energy_statistics(atomic_energies=stats["atomic_energies"], scale=stats["scale"],
                                       shift=stats["shift"])
    if float64:
        module = module.double()
    if calibrate_densities and hasattr(module.model, "calibrate_density_scale"):
        scales = module.model.calibrate_density_scale([datamodule.calibration_batch()])
        log.info("density scales (RMS of ρ per iteration on the first training structures): %s",
                 ", ".join(f"{s:.3g}" for s in scales.tolist()))
    if hasattr(module.model, "build_graph") and abs(datamodule.cutoff - module.model.cutoff) > 1e-12:
        raise ValueError(f"data.cutoff ({datamodule.cutoff}) must equal model.cutoff ({module.model.cutoff}): "
                         "the data module caches the neighbour list")
    return module


def build_trainer(cfg: DictConfig, out_dir: Path):
    """The Lightning trainer of ``cfg.trainer`` with the loggers and callbacks of ``cfg`` (plus a
    :class:`~pyg_equireann.callbacks.TrainingBudget` when ``cfg.budget.minutes`` is set), writing to
    ``out_dir``; returns ``(trainer, callbacks)``."""
    loggers: List = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks: List = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    budget = cfg.get("budget") or {}
    if budget.get("minutes"):
        callbacks.append(TrainingBudget(**OmegaConf.to_container(budget, resolve=True)))
    plugins: List = [instantiate(p) for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins,
                          default_root_dir=str(out_dir), **trainer_adjustments(cfg))
    return trainer, callbacks


def command_line_keys() -> set:
    """Keys set by the command line of this Hydra run (``trainer.max_epochs=5`` → ``trainer.max_epochs``)."""
    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def trainer_adjustments(cfg: DictConfig) -> Dict[str, Any]:
    """Trainer arguments that depend on the situation: a training budget lifts the epoch cap of the
    trainer config (not one given on the command line, nor one that an epoch-wise cosine schedule
    anneals over: then the cap may stop training before the budget is used, and the stop line says so);
    outside a terminal (nohup, batch jobs, ``| tee``) the progress bar is off, the per-epoch log lines of
    :class:`~pyg_equireann.callbacks.EpochLog` take its place."""
    explicit, adjust = command_line_keys(), {}
    epoch_schedule = (cfg.get("module") or {}).get("scheduler") == "cosine"
    if (cfg.get("budget") or {}).get("minutes") and "trainer.max_epochs" not in explicit and not epoch_schedule:
        adjust["max_epochs"] = -1
    if not sys.stdout.isatty() and "trainer.enable_progress_bar" not in explicit:
        adjust["enable_progress_bar"] = False
    return adjust


def check_output_folders(cfg: DictConfig, out_dir: Path) -> None:
    """``PermissionError`` naming the first folder this run would write that is not writable: the run
    folder, the checkpoint folder(s), the loggers' folders and the budget's snapshot folder, checked
    before any data is read rather than when the first checkpoint is saved."""
    folders = {"run folder": out_dir}
    for name, node in list((cfg.get("callbacks") or {}).items()) + list((cfg.get("logger") or {}).items()):
        for key in ("dirpath", "save_dir"):
            if (node or {}).get(key):
                folders[f"{name} folder ({key})"] = Path(str(node[key]))
    budget = cfg.get("budget") or {}
    if budget.get("minutes") and budget.get("snapshots"):
        folders["snapshot folder"] = Path(str(budget.get("snapshot_dir") or out_dir / "snapshots"))
    for what, folder in folders.items():
        check_writable(folder, what)


def run(cfg: DictConfig) -> Optional[float]:
    from ..checkpoint import check_model_config, read_checkpoint

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    check_output_folders(cfg, out_dir)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    log.info("%s", datamodule.summary())
    if cfg.get("ckpt_path"):  # a clear error for an unreadable checkpoint or one of another model
        check_model_config(cfg.ckpt_path, read_checkpoint(cfg.ckpt_path), prepare_model_config(cfg.model, datamodule))
    module = build_module(cfg.model, cfg.module, datamodule, cfg.float64, cfg.get("calibrate_densities", True))
    trainer, callbacks = build_trainer(cfg, out_dir)
    if trainer.is_global_zero:
        write_run_info(out_dir, cfg, trainer)
    params = sum(p.numel() for p in module.parameters())
    log.info("model %s: %s parameters; run folder %s", type(module.model).__name__, f"{params:,}", out_dir)
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    summary = {"model": type(getattr(module.model, "model", module.model)).__name__, "parameters": params,
               "epochs": trainer.current_epoch, "steps": trainer.global_step,
               "fit_wall_seconds": time.perf_counter() - fit_start}
    stopped = next((c.reason for c in callbacks if isinstance(c, EpochLog)), None)
    if stopped:
        summary["stop_reason"] = stopped
    timer = next((c for c in callbacks if isinstance(c, TrainingBudget)), None)
    if timer is not None:
        summary.update({"budget_minutes": timer.seconds / 60, "budget_clock": timer.clock,
                        "training_minutes": timer.elapsed / 60})
    if trainer.is_global_zero:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))

    curve = learning_curve(out_dir, out_dir / "learning_curve.png")
    results: Dict[str, float] = {}
    if cfg.get("test"):
        ckpt = "best" if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path else None
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        for entry in tested:
            results.update({k: float(v) for k, v in entry.items()})
        if trainer.is_global_zero:
            (out_dir / "test_metrics.json").write_text(json.dumps(results, indent=2))
    if trainer.is_global_zero:
        print(f"\n{type(getattr(module.model, 'model', module.model)).__name__} trained for {trainer.current_epoch} epochs "
              f"({params:,} parameters)" + (f"; stopped because {stopped}" if stopped else ""))
        if results:
            print(metrics_table(results))
        print(f"run folder: {out_dir}")
        if curve:
            print(f"learning curve: {curve}")
    metric = cfg.get("optimized_metric")
    if metric:
        value = trainer.callback_metrics.get(metric)
        return float(value) if value is not None else float("inf")
    return None


@hydra_entry("train")
def main(cfg: DictConfig) -> Optional[float]:
    with user_errors():
        return run(cfg)


if __name__ == "__main__":
    main()
