"""Lightning callbacks."""
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights (validation, checkpoints and the end of training use the
    averaged weights), fixed for ``trainer.test(ckpt_path=...)`` after ``fit``: Lightning's callback
    would then load the raw (non-averaged) weights stored next to the EMA ones; here testing,
    validating and predicting from a checkpoint always use its EMA weights."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


class TrainingBudget(Callback):
    """Stops training after a budget of training time, counted inside training batches only
    (forward, backward, optimiser step; validation, testing and checkpointing are not counted), so
    that models are compared at equal cost. Optionally anneals the learning rate with a cosine over
    the budget (then use ``scheduler: none`` in the module) and saves snapshot checkpoints at
    fractions of the budget (for learning curves at equal time).

    Args:
        minutes: the budget.
        clock: ``"process"`` (CPU time of the process, all threads; robust to other load on the
            machine) or ``"wall"`` (elapsed time).
        cosine_lr: anneal every parameter group's lr from its initial value to ``min_lr``.
        min_lr: final learning rate of the cosine.
        snapshots: budget fractions (e.g. ``[0.1, 0.25, 0.5, 1.0]``) at which a checkpoint
            ``snapshot_dir/t<minutes>.ckpt`` is written (the EMA weights when the EMA callback is on).
        snapshot_dir: folder of the snapshots (default: ``<trainer.default_root_dir>/snapshots``).
    The elapsed time is saved in checkpoints, so a resumed run continues the same budget.
    """

    def __init__(self, minutes: float, clock: str = "process", cosine_lr: bool = False, min_lr: float = 1e-5,
                 snapshots: Optional[Sequence[float]] = None, snapshot_dir: Optional[str] = None):
        if clock not in ("process", "wall"):
            raise ValueError(f"clock must be 'process' or 'wall', got {clock!r}")
        if not minutes > 0:
            raise ValueError(f"the training budget must be positive, got {minutes} minutes")
        self.seconds = 60.0 * float(minutes)
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
    def fraction(self) -> float:
        return self.elapsed / self.seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
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
        if self._start is not None:
            self.elapsed += self._now() - self._start
            self._start = None
        while self._saved < len(self.snapshots) and self.fraction >= self.snapshots[self._saved]:
            self._save_snapshot(trainer)
            self._saved += 1
        if self.elapsed >= self.seconds:
            trainer.should_stop = True

    def _save_snapshot(self, trainer) -> None:
        folder = Path(self.snapshot_dir or Path(trainer.default_root_dir) / "snapshots")
        folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(folder / f"t{self.elapsed / 60:08.3f}min.ckpt"))

    def state_dict(self) -> Dict[str, Any]:
        return {"elapsed": self.elapsed, "saved": self._saved, "initial_lr": self._initial_lr}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.elapsed = float(state_dict["elapsed"])
        self._saved = int(state_dict["saved"])
        self._initial_lr = state_dict.get("initial_lr")
