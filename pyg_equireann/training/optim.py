"""Optimiser and learning-rate schedules of :class:`~pyg_equireann.training.module.PotentialModule`.

The module takes them as factories, ``optimizer(params)`` and ``lr_scheduler(optimizer)`` (Hydra ``_partial_``
configs, e.g. ``conf/module/default.yaml``), and keeps their configs, not the callables, in its
hyperparameters, so that checkpoints stay plain (``torch.load(weights_only=True)``).
"""
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

Factory = Union[Callable, Mapping[str, Any], None]

#: modules whose classes and functions a saved optimiser or schedule config may name
_ALLOWED_PREFIXES = ("torch.optim.", "pyg_equireann.training.optim.")
_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, max_epochs: int, warmup_epochs: int = 0,
                       min_lr: float = 1e-5) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine from the optimiser's lr to ``min_lr`` over ``max_epochs`` epochs (stepped once per epoch), after
    ``warmup_epochs`` of linear warm-up from lr/10. ``max_epochs`` < 1 (e.g. -1, no cap) counts as 1."""
    warmup_epochs = int(warmup_epochs)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(max(int(max_epochs), 1) - warmup_epochs, 1), eta_min=min_lr)
    if warmup_epochs <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def optimizer_config(lr: float = 5e-3, weight_decay: float = 0.0, betas=(0.9, 0.999),
                     amsgrad: bool = True) -> Dict[str, Any]:
    """The ``_partial_`` config of AdamW with these settings (fused: one kernel per step and no host sync per
    parameter, which the default for-each-parameter loop has)."""
    return {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": float(lr), "weight_decay": float(weight_decay),
            "betas": tuple(float(b) for b in betas), "amsgrad": bool(amsgrad), "fused": True}


def scheduler_config(scheduler: str = "plateau", plateau_factor: float = 0.8, plateau_patience: int = 10,
                     warmup_epochs: int = 0, min_lr: float = 1e-5, max_epochs: Optional[int] = 100) -> Optional[Dict[str, Any]]:
    """The ``_partial_`` config of the schedule named ``scheduler``: ``"plateau"`` (ReduceLROnPlateau on the
    validation loss), ``"cosine"`` (:func:`cosine_with_warmup` over ``max_epochs``) or ``"none"`` (``None``).
    Also the resolver ``${lr_scheduler:...}`` of ``conf/module/default.yaml``."""
    if scheduler == "none":
        return None
    if scheduler == "plateau":
        return {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "_partial_": True, "mode": "min",
                "factor": float(plateau_factor), "patience": int(plateau_patience), "min_lr": float(min_lr)}
    if scheduler == "cosine":
        return {"_target_": "pyg_equireann.training.optim.cosine_with_warmup", "_partial_": True,
                "max_epochs": 1000 if max_epochs is None else int(max_epochs),  # None: Lightning's default
                "warmup_epochs": int(warmup_epochs), "min_lr": float(min_lr)}
    raise ValueError(f"scheduler must be 'plateau', 'cosine' or 'none', got {scheduler!r}")


def factory_config(factory: Factory, what: str) -> Optional[Dict[str, Any]]:
    """The plain ``_partial_`` config of ``factory``: a ``functools.partial`` of an importable class or
    function (what Hydra builds from a ``_partial_`` config), such a config, or ``None``."""
    from pyg_equireann.utils import plain

    if factory is None:
        return None
    if isinstance(factory, Mapping):
        return plain(factory)
    if isinstance(factory, functools.partial) and not factory.args and hasattr(factory.func, "__qualname__"):
        target = f"{factory.func.__module__}.{factory.func.__qualname__}"
        return {"_target_": target, "_partial_": True, **plain(dict(factory.keywords))}
    raise TypeError(f"{what} must be a functools.partial of a class or function (a Hydra _partial_ config) or "
                    f"its config, got {factory!r}")


def build_factory(config: Optional[Mapping[str, Any]], what: str) -> Optional[Callable]:
    """The callable of a ``_partial_`` config (:func:`factory_config`). A config may come from a checkpoint,
    which is not trusted: ``ValueError`` unless it names a ``torch.optim`` optimiser or schedule class, a
    schedule of this module or a class of your own allowed with
    :func:`~pyg_equireann.training.checkpoint.register_model_class` (or ``PYG_EQUIREANN_ALLOWED_MODELS``); its
    arguments are passed as they are (nothing nested is built)."""
    if config is None:
        return None
    from hydra.utils import get_object

    target = config.get("_target_")
    known = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    factory = None
    if isinstance(target, str) and target.startswith(_ALLOWED_PREFIXES):
        try:
            factory = get_object(target)
        except (ImportError, AttributeError, ValueError):
            pass
    if not (factory is cosine_with_warmup or (isinstance(factory, type) and issubclass(factory, known))):
        from pyg_equireann.training.checkpoint import _allowed_target

        if not (isinstance(target, str) and _allowed_target(target)):
            raise ValueError(f"{what} config names {target!r}: only torch.optim optimisers and schedules, "
                             "pyg_equireann.training.optim.cosine_with_warmup and classes allowed with "
                             "pyg_equireann.training.checkpoint.register_model_class are built")
        factory = get_object(target)
    return functools.partial(factory, **{k: v for k, v in config.items() if k not in _HYDRA_KEYS})
