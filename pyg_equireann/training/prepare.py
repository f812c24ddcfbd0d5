"""Model preparation: a model config with its ``auto`` values filled from the training data, and a
:class:`~pyg_equireann.training.module.PotentialModule` with the training set's energy statistics and
calibrated densities."""
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

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
    """Resolve ``auto`` entries (``elements``, ``avg_num_neighbors``) from the training data."""
    config = OmegaConf.to_container(model_cfg, resolve=True)
    neighbors = datamodule.statistics["avg_num_neighbors"] if config.get("avg_num_neighbors") == "auto" else None
    return fill_auto(config, datamodule.elements, neighbors)


def build_module(model_cfg: DictConfig, module_cfg: DictConfig, datamodule, float64: bool = False,
                 calibrate_densities: bool = True):
    """A :class:`~pyg_equireann.training.module.PotentialModule` for ``model_cfg`` with loss/optimiser settings
    ``module_cfg``, the energy statistics (E0, scale, shift) of the data module's training set and, for
    EquiREANN/REANN with ``calibrate_densities``, densities scaled to unit RMS on the first training structures."""
    from pyg_equireann.training.module import PotentialModule

    model_config = prepare_model_config(model_cfg, datamodule)
    module = PotentialModule(model=model_config, **OmegaConf.to_container(module_cfg, resolve=True))
    stats = datamodule.statistics
    module.model.set_energy_statistics(atomic_energies=stats["atomic_energies"], scale=stats["scale"],
                                       shift=stats["shift"])
    if float64:
        module = module.double()
    if calibrate_densities and module.model.calibrates_densities:
        scales = module.model.calibrate_density_scale([datamodule.calibration_batch()])
        log.info("density scales (RMS of ρ per iteration on the first training structures): %s",
                 ", ".join(f"{s:.3g}" for s in scales.tolist()))
    if module.model.caches_graph and abs(datamodule.cutoff - module.model.cutoff) > 1e-12:
        raise ValueError(f"data.cutoff ({datamodule.cutoff}) must equal model.cutoff ({module.model.cutoff}): "
                         "the data module caches the neighbour list")
    return module
