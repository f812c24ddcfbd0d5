"""Training-step speed: milliseconds per optimisation step and structures per second of every model, the step
taken as ``equireann-train`` takes it (:class:`~pyg_equireann.training.module.PotentialModule` built by
:func:`~pyg_equireann.training.prepare.build_module`, energy + force loss with a double backward, the module's
AdamW) on the batches its data module yields (cached neighbour list), models interleaved in one process by
:func:`~pyg_equireann.experiments.bench.speed.interleaved_timings`."""
import itertools
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def training_step(module, optimizer: torch.optim.Optimizer) -> Callable[[Any], Tensor]:
    """``step(batch) -> loss``: one optimisation step as the trainer takes it: ``module.predict_batch(batch,
    create_graph=True)`` (forces by autograd, kept differentiable), the module's energy + force loss,
    ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad()`` (gradients set to None)."""
    def step(batch) -> Tensor:
        out = module.predict_batch(batch, create_graph=True)
        loss, _ = module._loss_and_errors(batch, out)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def module_optimizer(module) -> torch.optim.Optimizer:
    """The optimiser the trainer would use: the first of ``module.configure_optimizers()``."""
    optimizers = module.configure_optimizers()
    return optimizers["optimizer"] if isinstance(optimizers, Mapping) else optimizers


def compose_training(data_overrides: Sequence[str], cutoff: float, float64: bool = False,
                     module_overrides: Optional[Mapping[str, Any]] = None):
    """The data module (set up, cut off at ``cutoff`` Å as the model needs it) and module config of
    ``conf/train.yaml`` composed with ``data_overrides`` (e.g. ``["data=rmd17", "data.molecule=aspirin"]``);
    ``module_overrides``: ``module.<key>`` values (e.g. ``{"lr": 1e-3}``)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pyg_equireann.config import register_resolvers
    from pyg_equireann.experiments.harness import compose

    register_resolvers()  # ${data_root:}, ${lr_scheduler:...} outside the Hydra apps too
    cfg = compose("train", [*data_overrides, f"data.cutoff={cutoff}", f"float64={str(bool(float64)).lower()}",
                            "++data.progress=false"])
    for key, value in (module_overrides or {}).items():
        OmegaConf.update(cfg, f"module.{key}", value, force_add=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule, cfg.module


def device_batches(datamodule, batch_size: int, count: int, device: torch.device) -> List[Any]:
    """The first ``count`` training batches of ``batch_size`` structures (fewer if the epoch is shorter), on
    ``device``, as the data module's loader yields them (shuffled by its seed)."""
    datamodule.batch_size = int(batch_size)
    return [batch.to(device) for batch in itertools.islice(datamodule.train_dataloader(), count)]


def run_train_step(model_configs: Mapping[str, Mapping[str, Any]], data_overrides: Sequence[str],
                   batch_sizes: Sequence[int] = (5, 32), repeats: int = 20, warmup: int = 5,
                   max_seconds: float = 60.0, device: str = "cpu", float64: bool = False,
                   reference: str = "equireann", module_overrides: Optional[Mapping[str, Any]] = None,
                   progress: bool = True) -> List[Dict[str, Any]]:
    """The training-step table: one row per (batch size, model) with the median (and minimum) ms per step,
    structures per second, step time ÷ ``reference``'s (of the medians, and of the minima), parameters and, on
    CUDA, ``peak_mb`` (the most memory allocated during a timed step beyond what was allocated before
    it: activations, gradients, temporaries; not the weights, optimiser state or batches). Each model gets a
    data module at its own cutoff (cached neighbour list, as in training) and steps through its first
    ``warmup + repeats`` batches in turn; models are interleaved after ``warmup`` steps each. Models that run
    out of memory are reported as ``OOM``."""
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from pyg_equireann.experiments.bench.speed import free_memory, interleaved_timings
    from pyg_equireann.training.prepare import build_module

    device = torch.device(device)
    datamodules: Dict[float, Tuple[Any, Any]] = {}
    rows: List[Dict[str, Any]] = []
    for batch_size in tqdm(list(batch_sizes), desc="training step", disable=not progress):
        modules, calls, atoms = {}, {}, {}
        for name, config in model_configs.items():
            cutoff = float(config["cutoff"])
            if cutoff not in datamodules:
                datamodules[cutoff] = compose_training(data_overrides, cutoff, float64, module_overrides)
            datamodule, module_cfg = datamodules[cutoff]
            torch.manual_seed(0)
            module = build_module(OmegaConf.create(dict(config)), module_cfg, datamodule, float64).to(device)
            batches = device_batches(datamodule, batch_size, max(warmup, 1) + repeats, device)
            step, cycle = training_step(module, module_optimizer(module)), itertools.cycle(batches)
            modules[name], calls[name] = module, (lambda step=step, cycle=cycle: step(next(cycle)))
            atoms[name] = sum(int(b.num_nodes) for b in batches) / len(batches)
        timings = interleaved_timings(calls, repeats, warmup, max_seconds, str(device))
        ref, ref_min = (timings.get(reference, {}).get(key) for key in ("median_s", "min_s"))
        for name, result in timings.items():
            row = {"batch_size": int(batch_size), "atoms_per_step": atoms[name], "model": name,
                   "parameters": sum(p.numel() for p in modules[name].parameters()), "device": device.type,
                   "status": result["status"], "note": result.get("note", "")}
            if result["status"] == "ok":
                row.update({
                    "ms_per_step": 1e3 * result["median_s"],
                    "ms_per_step_min": 1e3 * result["min_s"],
                    "structures_per_s": batch_size / result["median_s"],
                    "ratio_to_reference": result["median_s"] / ref if ref else None,
                    "ratio_to_reference_min": result["min_s"] / ref_min if ref_min else None,
                    "repeats": len(result["samples"]),
                    "peak_mb": result.get("peak_mb"),
                })
            rows.append(row)
        del modules, calls, timings
        free_memory(device)
    return rows
