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
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: "str | os.PathLike") -> Path:
    """``torch.save(obj)`` to ``path`` via ``.<name>.<random>.tmp`` in the same folder + fsync + ``os.replace``:
    readers (and a run killed at any moment) see either the old file or the complete new one."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by earlier saves that were killed
        if str(stale) != tmp:
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
