"""What a training run is built of, from its config: the model config with its ``auto`` values filled from the
training data (the one place where they are resolved), the :class:`~pyg_equireann.training.module.PotentialModule`
(``cfg.module``, ``_target_``) with the training set's energy statistics and calibrated densities, and the
Lightning trainer (``cfg.trainer``) with the loggers and callbacks of the config."""
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from hydra.utils import instantiate
from lightning.fabric.plugins import CheckpointIO
import torch
from omegaconf import DictConfig, OmegaConf

from pyg_equireann.training.checkpoint import AtomicCheckpointIO
from pyg_equireann.utils import default_dtype

log = logging.getLogger("pyg_equireann.training")


def fill_auto(config: Mapping[str, Any], elements: Sequence[int],
              avg_num_neighbors: Optional[float]) -> Dict[str, Any]:
    """A copy of a model config dict with its ``auto`` entries (``elements``, ``avg_num_neighbors``) set."""
    config = dict(config)
    if config.get("elements") == "auto":
        config["elements"] = list(elements)
    if config.get("avg_num_neighbors") == "auto":
        config["avg_num_neighbors"] = float(avg_num_neighbors)
    return config


def prepare_model_config(model_cfg: DictConfig, datamodule) -> Dict[str, Any]:
    """The model config (plain, resolved) with its ``auto`` entries filled from the training data: ``elements``
    (the training set's elements) and ``avg_num_neighbors`` (its mean neighbour count)."""
    config = OmegaConf.to_container(model_cfg, resolve=True)
    neighbors = datamodule.statistics["avg_num_neighbors"] if config.get("avg_num_neighbors") == "auto" else None
    return fill_auto(config, datamodule.elements, neighbors)


def build_module(model_cfg: DictConfig, module_cfg: DictConfig, datamodule, float64: bool = False,
                 calibrate_densities: bool = True):
    """The :class:`~pyg_equireann.training.module.PotentialModule` of ``module_cfg`` (``_target_``; its optimizer
    and lr_scheduler ``_partial_`` configs become callables) for the model ``model_cfg``
    (:func:`prepare_model_config`), with the energy statistics (E0, scale, shift) of the data module's training
    set and, for EquiREANN/REANN with ``calibrate_densities``, densities scaled to unit RMS on the first training
    structures. A ``module_cfg`` without ``_target_`` (an old run's record) is PotentialModule's."""
    from pyg_equireann.training.module import PotentialModule

    model_config = prepare_model_config(model_cfg, datamodule)
    # resolved first, so that ${lr_scheduler:...} is a _partial_ config when instantiate reads it; the model
    # config is passed after instantiate, which would build it (the module keeps it as the checkpoint's recipe)
    module_config = {"_target_": f"{PotentialModule.__module__}.PotentialModule",
                     **OmegaConf.to_container(module_cfg, resolve=True)}
    # built under the run's dtype: constants a model computes at construction (MACE's Wigner 3j symbols and
    # contraction matrices) would stay float32-rounded by a later .double() (equivariant to ~1e-10 only)
    with default_dtype(torch.float64 if float64 else None):
        module = instantiate(module_config, _partial_=True)(model=model_config)
    stats = datamodule.statistics
    module.model.set_energy_statistics(atomic_energies=stats["atomic_energies"], scale=stats["scale"],
                                       shift=stats["shift"])
    if float64:
        module = module.double()
    if calibrate_densities and module.model.calibrates_densities:
        scales = module.model.calibrate_density_scale([datamodule.calibration_batch()])
        log.info("density scales (RMS of ρ per iteration%s on the first training structures): %s",
                 "" if scales.dim() == 1 else " and invariant group",
                 ", ".join(f"{s:.3g}" for s in scales.flatten().tolist()))
    if module.model.caches_graph and abs(datamodule.cutoff - module.model.cutoff) > 1e-12:
        raise ValueError(f"data.cutoff ({datamodule.cutoff}) must equal model.cutoff ({module.model.cutoff}): "
                         "the data module caches the neighbour list")
    return module


def build_trainer(cfg: DictConfig, out_dir: Path):
    """The Lightning trainer of ``cfg.trainer`` (``_target_``) with the loggers of ``cfg.logger`` and the callbacks
    of ``cfg.callbacks`` (the training budget among them), atomic checkpoint writes unless a plugin of the trainer
    config does the IO, and :func:`trainer_adjustments`, writing to ``out_dir``; returns ``(trainer, callbacks)``."""
    loggers: List = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks: List = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    plugins: List = [instantiate(p) for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins,
                          default_root_dir=str(out_dir), **trainer_adjustments(cfg))
    return trainer, callbacks


def trainer_adjustments(cfg: DictConfig) -> Dict[str, Any]:
    """Trainer arguments that depend on the situation: a training budget lifts the epoch cap of the
    trainer config (not one given on the command line, nor one that an epoch-wise cosine schedule
    anneals over: then the cap may stop training before the budget is used, and the stop line says so);
    outside a terminal (nohup, batch jobs, ``| tee``) the progress bar is off, the per-epoch log lines of
    :class:`~pyg_equireann.training.callbacks.EpochLog` take its place."""
    from pyg_equireann.training.runs import command_line_keys

    explicit, adjust = command_line_keys(cfg), {}
    epoch_schedule = (cfg.get("module") or {}).get("scheduler") == "cosine"
    budget = cfg.get("budget") or {}
    if (budget.get("minutes") or budget.get("epochs")) and "trainer.max_epochs" not in explicit and not epoch_schedule:
        adjust["max_epochs"] = -1
    if not sys.stdout.isatty() and "trainer.enable_progress_bar" not in explicit:
        adjust["enable_progress_bar"] = False
    return adjust
