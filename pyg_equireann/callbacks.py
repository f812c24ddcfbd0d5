"""Lightning callbacks."""
from typing import Any, Dict

from lightning.pytorch.callbacks import EMAWeightAveraging
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
