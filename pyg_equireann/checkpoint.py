"""Checkpoint files: atomic writes, reads with clear errors, model-config comparison.

Lightning's own ``TorchCheckpointIO`` (2.6) writes through ``fsspec``'s transaction: the bytes go to a
``tempfile.mkstemp()`` file in the system temporary folder, which ``shutil.move`` then renames onto the
target. That is atomic only when the temporary folder is on the same file system as the checkpoint; on
another one (a local ``/tmp`` and a network ``/scratch``, or a tmpfs) ``shutil.move`` copies into the
target in place, so a kill during the copy leaves a truncated ``last.ckpt``, and killed saves leave
checkpoint-sized files in ``/tmp``. :class:`AtomicCheckpointIO` writes next to the target, fsyncs and
renames with ``os.replace``, which is atomic on POSIX and Windows file systems.
"""
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


def _owner_alive(temp: Path, prefix: str) -> bool:
    """Whether the writer of the temporary file ``temp`` (``<prefix><host>.<pid>.<random>.tmp``) may still be
    writing it: a live pid of this host, or a file of another host (a shared file system) younger than a day.
    Names without an owner (written before owners were recorded) count as left by a killed save."""
    parts = temp.name[len(prefix):].rsplit(".", 3)  # host names may contain dots
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    if parts[0] != socket.gethostname():
        try:
            return time.time() - temp.stat().st_mtime < 86400
        except FileNotFoundError:
            return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: the pid exists (another user's process)
        pass
    return True


def atomic_torch_save(obj: Any, path: "str | os.PathLike") -> Path:
    """``torch.save(obj)`` to ``path`` via ``.<name>.<host>.<pid>.<random>.tmp`` in the same folder + fsync +
    ``os.replace``: readers (and a run killed at any moment) see either the old file or the complete new one.
    Temporary files left by killed writers (a pid of this host that is gone) are removed; those of live
    writers (another run saving to the same folder) are left alone, so concurrent writers never fail."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{socket.gethostname()}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for stale in path.parent.glob(f"{prefix}*.tmp"):  # left by earlier saves that were killed
        if str(stale) != tmp and not _owner_alive(stale, prefix):
            stale.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose saves are atomic (:func:`atomic_torch_save`); remote URLs
    (``s3://`` ...) fall back to Lightning's writer. Use ``Trainer(plugins=[AtomicCheckpointIO()])``;
    ``equireann-train`` does."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        text = str(path)
        if "://" in text and not text.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        atomic_torch_save(checkpoint, text[len("file://"):] if text.startswith("file://") else text)


class BestAndLastCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` (``best.ckpt`` by ``monitor``) whose ``last.ckpt``
    (``save_last=True``) is always the last state of the run: written at the end of every epoch, when training
    stops early (``TrainingBudget``, ``trainer.max_time``, early stopping) and when it is interrupted
    (``KeyboardInterrupt``, ``SIGTERM`` as SLURM sends before a time limit). Lightning 2.6's ``ModelCheckpoint``
    writes ``last.ckpt`` only together with a new best checkpoint, so a resume from it silently repeated
    every epoch since the best one. Other exceptions save nothing: their state may be broken (NaN weights)."""

    _last_saved_step: Optional[int] = None

    @property
    def state_key(self) -> str:  # the key of ModelCheckpoint: checkpoints of either class resume with either
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step

    def _save_last_now(self, trainer) -> None:
        if (not self.save_last or trainer.fast_dev_run or trainer.sanity_checking
                or trainer.state.fn != TrainerFn.FITTING or self._last_saved_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_now(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self._save_last_now(trainer)


def read_checkpoint(path: "str | os.PathLike", map_location="cpu") -> Dict[str, Any]:
    """A pyg_equireann training checkpoint as a dict; ``FileNotFoundError`` or ``ValueError`` naming
    the file for missing, empty, truncated, corrupt or foreign files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: checkpoint file is empty (0 bytes); use another checkpoint of the run")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=False)
    except Exception as exc:  # RuntimeError, EOFError, UnpicklingError, ... from a damaged file
        raise ValueError(
            f"{path}: cannot read the checkpoint ({size} bytes): the file is truncated or corrupt "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Use another checkpoint "
            "of the run (checkpoints/best.ckpt or last.ckpt)"
        ) from exc
    config = (checkpoint.get("hyper_parameters") or {}).get("model_config") if isinstance(checkpoint, dict) else None
    if config is None or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a pyg_equireann training checkpoint (no state_dict and model_config)")
    return checkpoint


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return not model_config_differences(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def model_config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> List[str]:
    """``["key: checkpoint X, requested Y", ...]`` for the entries of two model configs that differ
    (floats compared to 1e-9 relative)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(requested), key=str):
        a, b = saved.get(key, missing), requested.get(key, missing)
        if a is missing or b is missing or not _same(a, b):
            show = lambda v: "(not set)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: checkpoint {show(a)}, requested {show(b)}")
    return out


def check_model_config(path: "str | os.PathLike", checkpoint: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
    """ValueError listing the differences if the checkpoint's model config is not ``requested``."""
    saved = checkpoint["hyper_parameters"]["model_config"]
    differences = model_config_differences(saved, requested)
    if differences:
        raise ValueError(
            f"{path} holds a different model than the one asked for: " + "; ".join(f"model.{d}" for d in differences)
            + ". Resume with the checkpoint's model settings, or start a new run without ckpt_path"
        )
