"""Lightning callbacks."""
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, Timer
from lightning.pytorch.trainer.states import TrainerFn


def ema_multi_avg_fn(decay: float, warmup: bool = False):
    r"""``multi_avg_fn`` of an EMA (:class:`torch.optim.swa_utils.AveragedModel`): every floating-point tensor
    of a device moves towards the model's by (1 − d) in three ``torch._foreach_*`` calls (a Python loop over
    the parameters costs more than a small molecule's training step on a CPU); other tensors are copied.

    With ``warmup`` the decay ramps up as :math:`\min(d, (1 + n) / (10 + n))` after n updates (the
    TensorFlow/timm warm-up): the average follows the fast early training instead of holding on to the
    initial weights for ~1/(1 − d) steps. Tensor arithmetic on ``num_averaged``: no host sync."""

    @torch.no_grad()
    def ema_update(ema_params: List[Tensor], current_params: List[Tensor], num_averaged: Tensor) -> None:
        if not (torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0])):
            torch._foreach_copy_(ema_params, current_params)
            return
        if not warmup:
            torch._foreach_lerp_(ema_params, current_params, 1.0 - decay)
            return
        n = num_averaged.to(ema_params[0].dtype)
        rate = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)
        step = torch._foreach_sub(current_params, ema_params)
        torch._foreach_mul_(step, rate)
        torch._foreach_add_(ema_params, step)

    return ema_update


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights (validation, checkpoints and the end of training use the
    averaged weights), fixed for ``trainer.test(ckpt_path=...)`` after ``fit``: Lightning's callback
    would then load the raw (non-averaged) weights stored next to the EMA ones; here testing,
    validating and predicting from a checkpoint always use its EMA weights.

    Args:
        decay: the EMA decay d.
        warmup: ramp the decay up as min(d, (1 + n)/(10 + n)) over the first updates (:func:`ema_multi_avg_fn`);
            False: d from the first step (Lightning's, which holds a 3-epoch run near its initial weights).
        **kwargs: the other arguments of Lightning's ``EMAWeightAveraging``.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False, **kwargs: Any):
        super().__init__(decay=decay, **kwargs)
        self.warmup = bool(warmup)
        # AveragedModel takes multi_avg_fn over avg_fn: foreach updates instead of a loop over the parameters
        self._kwargs["multi_avg_fn"] = ema_multi_avg_fn(decay, self.warmup)
        self._kwargs["avg_fn"] = None
        self._cache_key: Optional[tuple] = None  # update_average's tensor lists belong to this (models, storage)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning's, with update_average() instead of AveragedModel.update_parameters
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update_average(pl_module)
            self._latest_update_step = trainer.global_step

    def update_average(self, pl_module) -> None:
        """``AveragedModel.update_parameters(pl_module)`` with the tensor lists built once (per device and
        dtype) instead of at every step: its per-step Python loop over the parameters costs more than the
        update itself. The first update (the copy) and an EMA on another device than the model take the
        ``AveragedModel`` path."""
        average = self._average_model
        first = next(pl_module.parameters())
        key = (id(average), id(pl_module), first.device, first.data_ptr())
        if self._cache_key != key:
            if int(average.n_averaged) == 0 or next(average.module.parameters()).device != first.device:
                average.update_parameters(pl_module)
                return
            averaged = list(average.module.parameters()) + (list(average.module.buffers()) if self._use_buffers else [])
            current = list(pl_module.parameters()) + (list(pl_module.buffers()) if self._use_buffers else [])
            groups: Dict[Any, Any] = {}
            for a, c in zip(averaged, current, strict=True):
                lists = groups.setdefault((a.device, a.dtype), ([], []))
                lists[0].append(a.detach())
                lists[1].append(c.detach())
            self._groups = list(groups.values())
            self._buffers = ([], []) if self._use_buffers else (
                [b.detach() for b in average.module.buffers()], [b.detach() for b in pl_module.buffers()])
            self._cache_key = key
        for averaged, current in self._groups:
            self._kwargs["multi_avg_fn"](averaged, current, average.n_averaged)
        if self._buffers[0]:
            torch._foreach_copy_(*self._buffers)
        average.n_averaged += 1


class TrainingBudget(Callback):
    """Stops training after a budget of training time, counted inside training batches only
    (forward, backward, optimiser step; validation, testing and checkpointing are not counted), so
    that models are compared at equal cost; or after a number of epochs, so that runs on machines of
    different speed take the same optimiser steps. Optionally anneals the learning rate with a cosine
    over the budget, step by step (then use ``scheduler: none`` in the module), and saves snapshot
    checkpoints at fractions of the budget (for learning curves).

    Args:
        minutes: the budget in minutes of ``clock``; ``None``: no time budget. With neither ``minutes`` nor
            ``epochs`` the callback does nothing, so that a config can always list it
            (``conf/callbacks/default.yaml``).
        epochs: the budget in epochs (optimiser steps = epochs × training batches per epoch) instead of
            minutes; the time inside training steps is still counted (snapshot names, the run summary).
        clock: ``"process"`` (CPU time of the process, all threads; robust to other load on the
            machine with one thread: with several, OpenMP threads spin while they wait for each other on
            a busy machine, and that time counts) or ``"wall"`` (elapsed time).
        cosine_lr: anneal every parameter group's lr from its initial value to ``min_lr``.
        min_lr: final learning rate of the cosine.
        snapshots: budget fractions (e.g. ``[0.1, 0.25, 0.5, 1.0]``) at which a checkpoint
            ``snapshot_dir/t<minutes>.ckpt`` is written (the EMA weights when the EMA callback is on).
        snapshot_dir: folder of the snapshots (default: ``<trainer.default_root_dir>/snapshots``).
    The elapsed time and steps are saved in checkpoints, so a resumed run continues the same budget.
    """

    def __init__(self, minutes: Optional[float] = None, clock: str = "process", cosine_lr: bool = False,
                 min_lr: float = 1e-5, snapshots: Optional[Sequence[float]] = None, snapshot_dir: Optional[str] = None,
                 epochs: Optional[int] = None):
        if clock not in ("process", "wall"):
            raise ValueError(f"clock must be 'process' or 'wall', got {clock!r}")
        if minutes is not None and not minutes > 0:
            raise ValueError(f"the training budget must be positive, got {minutes} minutes")
        if epochs is not None and (int(epochs) != epochs or not epochs >= 1):
            raise ValueError(f"the training budget in epochs must be a positive whole number, got {epochs}")
        if minutes is not None and epochs is not None:
            raise ValueError(f"give the training budget in minutes or in epochs, not both (got budget.minutes="
                             f"{minutes} and budget.epochs={epochs}; budget.minutes=null lifts a preset's minutes)")
        self.seconds = None if minutes is None else 60.0 * float(minutes)
        self.epochs = None if epochs is None else int(epochs)
        self.steps = 0  # training batches done
        self._batches_per_epoch: Optional[int] = None
        self.clock = clock
        self.cosine_lr = cosine_lr
        self.min_lr = float(min_lr)
        self.snapshots = sorted(float(f) for f in (snapshots or []))
        self.snapshot_dir = snapshot_dir
        self.elapsed = 0.0
        self._start: Optional[float] = None
        self._initial_lr: Optional[List[float]] = None
        self._saved = 0

    def _now(self) -> float:
        return time.process_time() if self.clock == "process" else time.perf_counter()

    @property
    def active(self) -> bool:
        return self.seconds is not None or self.epochs is not None

    @property
    def fraction(self) -> float:
        if self.epochs is not None:
            return self.steps / (self.epochs * self._batches_per_epoch) if self._batches_per_epoch else 0.0
        return self.elapsed / self.seconds if self.seconds is not None else 0.0

    @property
    def exhausted(self) -> bool:
        return self.active and self.fraction >= 1.0

    def describe(self) -> str:
        """E.g. ``"4.2 of 15 CPU minutes"`` (``"wall-clock minutes"`` for ``clock="wall"``), or
        ``"100 of 100 epochs (11.3 CPU minutes)"``."""
        clock = "CPU" if self.clock == "process" else "wall-clock"
        if self.epochs is not None:
            done = self.steps / self._batches_per_epoch if self._batches_per_epoch else 0
            return f"{done:g} of {self.epochs} epochs ({self.elapsed / 60:.2f} {clock} minutes)"
        return f"{self.elapsed / 60:.2f} of {self.seconds / 60:g} {clock} minutes"

    def on_train_start(self, trainer, pl_module) -> None:
        if self.epochs is None:
            return
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches < 1:
            raise ValueError("budget.epochs needs a training set of known length (an epoch of "
                             f"{batches} batches); give the budget in minutes")
        self._batches_per_epoch = int(batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.active:
            return
        if self.cosine_lr:
            optimizers = trainer.optimizers
            if self._initial_lr is None:
                self._initial_lr = [g.get("initial_lr", g["lr"]) for o in optimizers for g in o.param_groups]
            groups = [g for o in optimizers for g in o.param_groups]
            factor = 0.5 * (1.0 + math.cos(math.pi * min(self.fraction, 1.0)))
            for group, lr0 in zip(groups, self._initial_lr):
                group["lr"] = self.min_lr + (lr0 - self.min_lr) * factor
        self._start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active:
            return
        if self._start is not None:
            self.elapsed += self._now() - self._start
            self._start = None
        self.steps += 1
        while self._saved < len(self.snapshots) and self.fraction >= self.snapshots[self._saved]:
            self._save_snapshot(trainer)
            self._saved += 1
        if self.exhausted:
            trainer.should_stop = True

    def _save_snapshot(self, trainer) -> None:
        folder = Path(self.snapshot_dir or Path(trainer.default_root_dir) / "snapshots")
        folder.mkdir(parents=True, exist_ok=True)
        # full state (the EMA weights live in the callback state); explicit, so Lightning logs nothing
        trainer.save_checkpoint(str(folder / f"t{self.elapsed / 60:08.3f}min.ckpt"), weights_only=False)

    def state_dict(self) -> Dict[str, Any]:
        if not self.active:
            return {}  # Lightning saves no state for the callback
        return {"elapsed": self.elapsed, "saved": self._saved, "initial_lr": self._initial_lr, "steps": self.steps}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not self.active:
            return
        self.elapsed = float(state_dict["elapsed"])
        self._saved = int(state_dict["saved"])
        self._initial_lr = state_dict.get("initial_lr")
        self.steps = int(state_dict.get("steps", 0))


def training_budget(callbacks) -> Optional[TrainingBudget]:
    """The active :class:`TrainingBudget` among ``callbacks`` (e.g. ``trainer.callbacks``), else ``None``."""
    return next((c for c in callbacks if isinstance(c, TrainingBudget) and c.active), None)


def stop_reason(trainer) -> str:
    """Why ``trainer.fit`` ended normally: the training budget, ``trainer.max_time``, early stopping,
    ``trainer.max_epochs`` or ``trainer.max_steps`` (checked in this order)."""
    budget = training_budget(trainer.callbacks)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    early = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping) and c.stopped_epoch > 0), None)
    if budget is not None and budget.exhausted:
        return f"the training budget was used ({budget.describe()})"
    if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        return f"the time limit trainer.max_time was reached ({timer.time_elapsed() / 60:.1f} wall-clock minutes)"
    if early is not None:
        return (f"early stopping: {early.monitor} did not improve for {early.patience} validations "
                f"(epoch {early.stopped_epoch})")
    if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        reason = f"trainer.max_epochs={trainer.max_epochs} was reached"
        if budget is not None:
            reason += (f" before the budget was used ({budget.describe()}); a budget lifts the epoch cap unless "
                       "trainer.max_epochs is given on the command line or module.scheduler=cosine anneals over "
                       "the epochs (budget.cosine_lr=true module.scheduler=none anneals over the budget)")
        return reason
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return f"trainer.max_steps={trainer.max_steps} was reached"
    return "a callback stopped training"


class EpochLog(Callback):
    """One log line per epoch (epoch, learning rate, training loss and force MAE, validation energy and
    force MAE, elapsed wall-clock time) and a last line saying why training stopped (:func:`stop_reason`,
    an interrupt, SIGTERM or an error), through Python logging, so that Hydra writes them into the run's
    ``train.log`` and onto stdout. While Lightning's progress bar is drawn in a terminal, the epoch
    lines go to the log file only (the bar shows the same numbers); the stop line goes everywhere.

    Attributes:
        reason: why training stopped (set at the end of ``fit``), ``None`` before.
    """

    def __init__(self, logger: str = "equireann-train"):
        self._log = logging.getLogger(logger)
        self.reason: Optional[str] = None
        self._start: Optional[float] = None
        self._muted: List[logging.Handler] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self.reason = None
        if trainer.progress_bar_callback is not None and trainer.is_global_zero:
            self._muted = [h for h in logging.getLogger().handlers if _is_terminal_handler(h)]
            for handler in self._muted:
                handler.addFilter(_drop_epoch_lines)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for handler in self._muted:
            handler.removeFilter(_drop_epoch_lines)
        self._muted = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._log.info("%s", self.epoch_line(trainer), extra={"epoch_line": True})

    def epoch_line(self, trainer) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        epoch = f"epoch {trainer.current_epoch}"
        if trainer.max_epochs not in (None, -1):
            epoch += f"/{trainer.max_epochs - 1}"
        parts = [epoch]
        budget = training_budget(trainer.callbacks)
        if budget is not None:
            parts.append(f"budget {100 * min(budget.fraction, 1.0):.0f}%")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")

        def errors(split):
            shown = [f"{label} {metrics[f'{split}/{key}']:.2f} {unit}"
                     for key, label, unit in (("energy_mae", "E", "meV"), ("forces_mae", "F", "meV/Å"))
                     if f"{split}/{key}" in metrics]
            return " ".join(shown)

        train = " ".join(x for x in ((f"loss {metrics['train/loss']:.4g}" if "train/loss" in metrics else ""),
                                     errors("train")) if x)
        if train:
            parts.append(f"train {train}")
        if errors("val"):
            parts.append(f"val MAE {errors('val')}")
        parts.append(f"elapsed {_hms(time.perf_counter() - (self._start or time.perf_counter()))}")
        return " | ".join(parts)

    def on_train_end(self, trainer, pl_module) -> None:
        self.reason = stop_reason(trainer)
        if trainer.is_global_zero:
            self._log.info("training stopped after %d epochs: %s", trainer.current_epoch, self.reason)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.reason = "interrupted (Ctrl+C / SIGINT)"
        elif type(exception).__name__ == "SIGTERMException":
            self.reason = "terminated (SIGTERM, e.g. a batch system's time limit)"
        else:
            self.reason = f"failed: {type(exception).__name__}: {exception}"
        if trainer.is_global_zero:
            self._log.warning("training stopped in epoch %d: %s", trainer.current_epoch, self.reason)


def _is_terminal_handler(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return (not isinstance(handler, logging.FileHandler) and stream is not None
            and hasattr(stream, "isatty") and stream.isatty())


def _drop_epoch_lines(record: logging.LogRecord) -> bool:
    return not getattr(record, "epoch_line", False)


def _hms(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
