"""Lightning module that trains any energy model ``model(z, pos, batch)`` on energies, forces, stress."""
import os
import random
from typing import Any, Dict, List, Mapping, Optional, Union

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from pyg_equireann.graph.forces import energy_forces_stress
from pyg_equireann.models.base import Potential
from pyg_equireann.models.referenced import ReferencedModel
from pyg_equireann.training.evaluation import ErrorMetrics, batch_errors
from pyg_equireann.training.optim import Factory, build_factory, factory_config, optimizer_config, scheduler_config
from pyg_equireann.utils import plain

#: stress loss weight that ``stress_weight="auto"`` uses when the training data holds stress, × (σ − σ̂)² in
#: (eV/Å³)² (stresses are ~0.01-0.1 eV/Å³; the value of the cu_emt experiment)
AUTO_STRESS_WEIGHT = 1000.0


def build_model(model: Union[nn.Module, Mapping[str, Any]], source: Optional[str] = None) -> nn.Module:
    """An nn.Module from a module or a Hydra-style config ``{"_target_": ..., ...}``. Models without
    per-element reference energies (PyG's SchNet, DimeNet++, ViSNet) are wrapped in
    :class:`~pyg_equireann.models.referenced.ReferencedModel` so every model learns the same targets.
    ``source``: the file a config was read from; it is then instantiated only if every ``_target_``
    is an allowed model class (:func:`~pyg_equireann.training.checkpoint.check_model_targets`)."""
    if isinstance(model, Mapping):
        from hydra.utils import instantiate

        model = plain(model)
        if source is not None:
            from pyg_equireann.training.checkpoint import check_model_targets, upgrade_targets

            model = upgrade_targets(model)
            check_model_targets(model, source)
        model = instantiate(model)
    if not isinstance(model, Potential):
        model = ReferencedModel(model)
    return model


class PotentialModule(L.LightningModule):
    r"""Trains an interatomic potential on energies and forces (and stress), forces always by
    autograd of the energy, so EquiREANN, REANN and PyG's SchNet, DimeNet++ or ViSNet are trained
    identically.

    Loss (per batch): :math:`w_E \langle ((E-\hat E)/N)^2\rangle + w_F \langle (F-\hat F)^2\rangle
    + w_\sigma \langle(\sigma-\hat\sigma)^2\rangle` in (eV/atom)², (eV/Å)², (eV/Å³)²; with
    ``energy_loss="total"`` the energy term is :math:`w_E \langle (E-\hat E)^2\rangle` in eV².
    Metrics (per epoch, in meV): energy MAE/RMSE total and per atom, force MAE/RMSE (meV/Å), stress.
    Validation and test use the EMA weights when the ``EMAWeightAveraging`` callback is on (see the
    Hydra configs); checkpoints then hold the EMA weights as ``state_dict``.

    Args:
        model: the energy model, or its Hydra config (``_target_``), which is stored in the
            checkpoint so that :meth:`load_from_checkpoint` rebuilds it.
        energy_weight, forces_weight, stress_weight: loss weights. ``stress_weight="auto"``:
            :data:`AUTO_STRESS_WEIGHT` for batches with a stress (all or no frames of a file have one), else 0.
        energy_loss: ``"per_atom"`` (the error of E/N, the usual choice) or ``"total"`` (the error of E: an
            energy that does not grow with N, e.g. the twist of a long chain, keeps its weight in large structures).
        loss_schedule: optional ``{"start_epoch": k, "energy_weight": ..., "forces_weight": ...}``:
            weights switch at epoch k (e.g. more energy weight late in training, as MACE's stage two).
        optimizer: ``optimizer(params)`` → optimiser: a ``functools.partial`` (a Hydra ``_partial_`` config,
            e.g. ``torch.optim.AdamW``) or its config; default AdamW with ``lr``, ``weight_decay``, ``betas``,
            ``amsgrad``.
        lr_scheduler: ``lr_scheduler(optimizer)`` → schedule stepped once per epoch (ReduceLROnPlateau on the
            validation loss), likewise; default the schedule named by ``scheduler``.
        lr, weight_decay, betas, amsgrad: settings of the default optimiser.
        scheduler: the default schedule: ``"plateau"`` (ReduceLROnPlateau on the validation loss),
            ``"cosine"`` (to ``min_lr`` over ``trainer.max_epochs``, with ``warmup_epochs`` of linear
            warm-up, :func:`~pyg_equireann.training.optim.cosine_with_warmup`) or ``"none"``.
        plateau_factor, plateau_patience, min_lr: settings of the default schedule.
    The hyperparameters (and so checkpoints) hold the configs of ``optimizer`` and ``lr_scheduler``, not the
    callables.
    """

    def __init__(
        self,
        model: Union[nn.Module, Mapping[str, Any]],
        energy_weight: float = 1.0,
        forces_weight: float = 100.0,
        stress_weight: Union[float, str] = "auto",
        energy_loss: str = "per_atom",
        loss_schedule: Optional[Mapping[str, float]] = None,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        betas: List[float] = (0.9, 0.999),
        amsgrad: bool = True,
        scheduler: str = "plateau",
        plateau_factor: float = 0.8,
        plateau_patience: int = 10,
        warmup_epochs: int = 0,
        min_lr: float = 1e-5,
        optimizer: Factory = None,
        lr_scheduler: Factory = None,
    ):
        super().__init__()
        scheduler_config(scheduler)  # a clear error for an unknown name
        if energy_loss not in ("per_atom", "total"):
            raise ValueError(f"module.energy_loss must be 'per_atom' or 'total', got {energy_loss!r}")
        # plain containers only (no OmegaConf objects, no callables): checkpoints must load with weights_only=True
        config = plain(model) if isinstance(model, Mapping) else None
        loss_schedule, betas = plain(loss_schedule), plain(betas)
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        self.hparams.update(model_config=config, optimizer=factory_config(optimizer, "optimizer"),
                            lr_scheduler=factory_config(lr_scheduler, "lr_scheduler"))
        # a partial given by code (Hydra's _partial_ config at training time) is used as it is; a config (from a
        # checkpoint's hyperparameters) is built only if its class is allowed
        self._optimizer = optimizer if callable(optimizer) else build_factory(self.hparams.optimizer, "optimizer")
        self._lr_scheduler = (lr_scheduler if callable(lr_scheduler)
                              else build_factory(self.hparams.lr_scheduler, "lr_scheduler"))
        self.model = build_model(model)
        self.test_names: List[str] = []
        self.test_config_types: Dict[str, List[str]] = {}
        self._acc: Dict[str, ErrorMetrics] = {}
        self._train_sums: Optional[Tensor] = None  # Σ over the epoch's batches of n × (loss, E MAE, F MAE)
        self._train_count = 0

    @classmethod
    def from_checkpoint(cls, ckpt_path: str, map_location="cpu",
                        model_config: Optional[Mapping[str, Any]] = None) -> "PotentialModule":
        """Rebuild the module and its model from a training checkpoint (the EMA weights when the
        EMA callback was on), read with ``torch.load(weights_only=True)``. Missing, truncated, corrupt
        or foreign files, files with other pickled objects and model configs naming classes that are not
        allowed (:func:`~pyg_equireann.training.checkpoint.register_model_class`) raise FileNotFoundError or
        ValueError naming the file; with ``model_config``, so does a checkpoint of another model."""
        from pyg_equireann.training.checkpoint import check_model_config, read_checkpoint

        checkpoint = read_checkpoint(ckpt_path, map_location)
        if model_config is not None:
            check_model_config(ckpt_path, checkpoint, model_config)
        config = checkpoint["hyper_parameters"]["model_config"]
        return cls.load_from_checkpoint(str(ckpt_path), map_location=map_location, model=config, weights_only=True)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: Optional[bool] = True, **kwargs) -> "PotentialModule":
        """Lightning's ``load_from_checkpoint``, but with ``weights_only=True`` unless asked otherwise and,
        without a ``model`` argument, the model rebuilt from the checkpoint's own model config after the
        checks of :func:`~pyg_equireann.training.checkpoint.read_checkpoint` (prefer :meth:`from_checkpoint`)."""
        if "model" not in kwargs and isinstance(checkpoint_path, (str, os.PathLike)):
            from pyg_equireann.training.checkpoint import read_checkpoint

            checkpoint = read_checkpoint(checkpoint_path, map_location or "cpu")
            kwargs["model"] = checkpoint["hyper_parameters"]["model_config"]
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)

    # ------------------------------------------------------------------ physics
    def forward(self, batch) -> Dict[str, Tensor]:
        return self.predict_batch(batch, create_graph=False)

    def predict_batch(self, batch, create_graph: bool) -> Dict[str, Tensor]:
        """Energy (B,) float64, forces (N, 3) and, for periodic batches with stress, stress (B, 3, 3)."""
        cell = getattr(batch, "cell", None)
        stress = self._stress_weight(batch) > 0 or getattr(batch, "stress", None) is not None
        compute_stress = bool(stress and cell is not None)
        if self.model.caches_graph:
            return energy_forces_stress(
                self.model, batch.z, batch.pos, batch.batch, cell, getattr(batch, "pbc", None),
                compute_stress=compute_stress, create_graph=create_graph,
                edge_index=getattr(batch, "edge_index", None), cell_offsets=getattr(batch, "cell_offsets", None),
                num_graphs=int(batch.num_graphs), check=False,  # the data module checked every frame
            )
        if compute_stress:
            raise ValueError(f"stress is computed for models with a cached graph (EquiREANN, REANN), "
                             f"not for {type(getattr(self.model, 'model', self.model)).__name__}")
        pos = batch.pos.detach().requires_grad_(True)
        energy = self.model(batch.z, pos, batch.batch, cell=cell, pbc=getattr(batch, "pbc", None))
        forces = -torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)[0]
        return {"energy": energy, "forces": forces}

    def _stress_weight(self, batch=None) -> float:
        """``stress_weight`` as a number: ``"auto"`` is :data:`AUTO_STRESS_WEIGHT` if ``batch`` has a stress."""
        weight = self.hparams.get("stress_weight", 0.0)
        if isinstance(weight, str):
            if weight.lower() != "auto":
                raise ValueError(f"module.stress_weight must be a number or 'auto', got {weight!r}")
            return AUTO_STRESS_WEIGHT if getattr(batch, "stress", None) is not None else 0.0
        return float(weight)

    def _weights(self, batch=None):
        w = {"energy": self.hparams.energy_weight, "forces": self.hparams.forces_weight,
             "stress": self._stress_weight(batch)}
        schedule = self.hparams.loss_schedule
        if schedule and self.current_epoch >= int(schedule["start_epoch"]):
            w.update({k.replace("_weight", ""): v for k, v in schedule.items() if k.endswith("_weight")})
        return w

    def on_fit_start(self):
        """Say whether the stress of the training data enters the loss."""
        import logging

        dm = getattr(self.trainer, "datamodule", None)
        train = getattr(dm, "train_dataset", None)
        if train is None or not hasattr(train, "has") or not train.has("stress"):
            return
        weight, log = self.hparams.get("stress_weight", 0.0), logging.getLogger("pyg_equireann")
        if isinstance(weight, str) or float(weight) > 0:
            value = AUTO_STRESS_WEIGHT if isinstance(weight, str) else float(weight)
            log.info("the training data has stress: in the loss with stress_weight %g (module.stress_weight=%s)",
                     value, weight)
        else:
            log.warning("the training data has stress, but module.stress_weight=0 leaves it out of the loss "
                        "(set module.stress_weight=auto or a weight to train on it; it is still reported)")

    def _loss_and_errors(self, batch, out) -> Dict[str, Tensor]:
        errors = batch_errors(batch, out)
        w = self._weights(batch)
        energy_error = errors["energy" if self.hparams.get("energy_loss") == "total" else "energy_per_atom"]
        loss = w["energy"] * energy_error.square().mean()
        if "forces" in errors:
            loss = loss + w["forces"] * errors["forces"].square().mean()
        if "stress" in errors and w["stress"] > 0:
            loss = loss + w["stress"] * errors["stress"].square().mean()
        return loss, errors

    @staticmethod
    def _frame(batch, graph: int) -> str:
        idx = getattr(batch, "idx", None)
        return f"frame {int(idx.view(-1)[graph])}" if idx is not None else f"structure {graph} of the batch"

    def check_finite(self, batch, out: Dict[str, Tensor], loss: Tensor) -> None:
        """Nothing when ``loss`` is finite, else an error naming the frame, atom and quantity: ValueError
        for non-finite inputs or targets, FloatingPointError for non-finite predictions (diverged training)."""
        if bool(torch.isfinite(loss)):
            return
        ptr = getattr(batch, "ptr", None)
        for kind, source in (("input", batch), ("target", batch), ("predicted", out)):
            names = ("pos", "cell") if kind == "input" else ("energy", "forces", "stress")
            for name in names:
                value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
                if value is None or bool(torch.isfinite(value).all()):
                    continue
                bad = (~torch.isfinite(value.detach())).reshape(value.shape[0], -1).any(1).nonzero()[0, 0]
                row = int(bad)
                if name in ("pos", "forces") and ptr is not None:
                    graph = int(torch.searchsorted(ptr, torch.tensor(row), right=True)) - 1
                    where = f"{self._frame(batch, graph)}, atom {row - int(ptr[graph])}"
                else:
                    where = self._frame(batch, row)
                if kind == "predicted":
                    raise FloatingPointError(
                        f"predicted {name} is NaN or inf for {where}: training diverged (lower module.lr or "
                        "trainer.gradient_clip_val, or train in float64)")
                label = "position" if name == "pos" else name
                raise ValueError(f"{kind} {label} of {where} is NaN or inf")
        raise FloatingPointError("the loss is NaN or inf although energies and forces are finite (loss weights?)")

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        out = self.predict_batch(batch, create_graph=True)
        loss, errors = self._loss_and_errors(batch, out)
        self.check_finite(batch, out, loss)
        n = int(batch.num_graphs)
        forces_mae = (errors["forces"].detach().abs().mean() if "forces" in errors
                      else torch.full((), float("nan"), dtype=loss.dtype, device=loss.device))
        # summed here and logged once per epoch (on_train_batch_end): three self.log calls per step cost
        # more than a small molecule's whole training step on a CPU
        stats = n * torch.stack([loss.detach(), errors["energy"].detach().abs().mean(), forces_mae]).float()
        self._train_sums = stats if self._train_sums is None else self._train_sums + stats
        self._train_count += n
        return loss.to(next(self.model.parameters()).dtype)

    def on_train_epoch_start(self) -> None:
        self._train_sums, self._train_count = None, 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Logs the epoch's mean training loss and MAEs (meV, meV/Å) after its last batch, or after the
        batch at which a callback (training budget, time limit) stopped training."""
        trainer = self.trainer
        if self._train_sums is None or not (trainer.should_stop or batch_idx + 1 >= trainer.num_training_batches):
            return
        loss, energy_mae, forces_mae = (self._train_sums / self._train_count).unbind()
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=1, prog_bar=True)
        self.log("train/energy_mae", 1e3 * energy_mae, on_step=False, on_epoch=True, batch_size=1)
        self.log("train/forces_mae", 1e3 * forces_mae, on_step=False, on_epoch=True, batch_size=1)
        self._train_sums, self._train_count = None, 0

    def _evaluate(self, batch, split: str):
        if torch.is_inference_mode_enabled():
            raise RuntimeError("forces need autograd in validation/test: create the Trainer with inference_mode=False")
        with torch.enable_grad():
            out = self.predict_batch(batch, create_graph=False)
        loss, errors = self._loss_and_errors(batch, out)
        self.check_finite(batch, out, loss)
        if split not in self._acc:  # test sets with several config types are also reported per type
            self._acc[split] = ErrorMetrics(self.test_config_types.get(split, ()))
        self._acc[split].update(batch, errors, loss)
        return out, errors

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    @staticmethod
    def _test_split(name: str) -> str:
        return "test" if name == "test" else f"test/{name}"

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self.test_names[dataloader_idx] if dataloader_idx < len(self.test_names) else f"test{dataloader_idx}"
        self._evaluate(batch, self._test_split(name))

    def _reduce(self, t: Tensor) -> Tensor:
        if self.trainer is not None and self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")
        return t.cpu()

    def _log_split(self, split: str) -> Optional[float]:
        """Log the metrics of ``split`` (summed over DDP ranks); returns its loss."""
        metrics = self._acc.pop(split, None)
        if metrics is None:
            return None
        values = metrics.compute(self._reduce)
        for key, value in values.items():
            self.log(f"{split}/{key}", value, sync_dist=False, prog_bar=(split == "val" and key == "forces_mae"))
        return values.get("loss")

    def on_validation_epoch_end(self):
        loss = self._log_split("val")
        trainer = self._trainer
        if loss is None or trainer is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        # Step ReduceLROnPlateau here, before ModelCheckpoint saves at on_validation_end: Lightning steps it
        # after the checkpoint and skips that step when resuming, so a resumed run would lose one step.
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                config.scheduler.step(loss)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return  # stepped in on_validation_epoch_end
        super().lr_scheduler_step(scheduler, metric)

    def on_test_start(self):
        dm = getattr(self.trainer, "datamodule", None)
        self.test_names = list(getattr(dm, "test_names", []) or [])
        # {split: config type names} of the test sets with several config types (metrics per type too)
        self.test_config_types = {self._test_split(name): types
                                  for name, types in (getattr(dm, "test_config_types", None) or {}).items()}

    def on_test_epoch_end(self):
        for split in [s for s in list(self._acc) if s == "test" or s.startswith("test/")]:
            self._log_split(split)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        make_optimizer = self._optimizer or build_factory(
            optimizer_config(hp.lr, hp.weight_decay, hp.betas, hp.amsgrad), "optimizer")
        optimizer = make_optimizer(self.parameters())
        make_scheduler = self._lr_scheduler or build_factory(scheduler_config(
            hp.scheduler, hp.plateau_factor, hp.plateau_patience, hp.warmup_epochs, hp.min_lr,
            self._trainer.max_epochs if self._trainer is not None else 100), "lr_scheduler")
        if make_scheduler is None:
            return optimizer
        scheduler = make_scheduler(optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Plain tensors and tuples only, so that torch.load(weights_only=True) accepts the file: also the
        # data module's hyperparameters (OmegaConf lists from Hydra, paths from Python callers).
        for key in [k for k in checkpoint if k.endswith("hparams_type")]:
            checkpoint.pop(key)  # the class of an OmegaConf hparams container: plain dicts below
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            name, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(states["python"])
