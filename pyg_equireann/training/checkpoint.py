"""Checkpoint files: atomic writes, reads with clear errors, model-config comparison.

Lightning's own ``TorchCheckpointIO`` (2.6) writes through ``fsspec``'s transaction: the bytes go to a
``tempfile.mkstemp()`` file in the system temporary folder, which ``shutil.move`` then renames onto the
target. That is atomic only when the temporary folder is on the same file system as the checkpoint; on
another one (a local ``/tmp`` and a network ``/scratch``, or a tmpfs) ``shutil.move`` copies into the
target in place, so a kill during the copy leaves a truncated ``last.ckpt``, and killed saves leave
checkpoint-sized files in ``/tmp``. :class:`AtomicCheckpointIO` writes next to the target, fsyncs and
renames with ``os.replace``, which is atomic on POSIX and Windows file systems.
"""
import inspect
import math
import os
import pickle
import re
import socket
import sys
import time
import warnings
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


def _load_error(path: Path, size: int, exc: Exception) -> ValueError:
    """The ValueError for a file that ``torch.load(weights_only=True)`` refused or could not read."""
    text = str(exc)
    # weights_only refused a pickled object (an "Unsupported operand" is a damaged file instead)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower() and "Unsupported operand" not in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return ValueError(
            f"{path} contains pickled Python objects that are not allowed{what}: loading them could run code; "
            "pyg_equireann only loads checkpoints with weights_only=True (tensors and plain Python values, "
            "which is all that equireann-train writes)"
        )
    lines = [line.strip() for line in text.splitlines() if "Unsupported operand" in line] or text.splitlines() or [""]
    return ValueError(
        f"{path}: cannot read the checkpoint ({size} bytes): the file is truncated or corrupt "
        f"({type(exc).__name__}: {lines[0]}). Use another checkpoint of the run (checkpoints/best.ckpt or last.ckpt)"
    )


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
    """A pyg_equireann training checkpoint as a dict, read with ``torch.load(weights_only=True)`` (no
    code runs); ``FileNotFoundError`` or ``ValueError`` naming the file for missing, empty, truncated,
    corrupt or foreign files, files holding other pickled objects, and model configs whose
    ``_target_`` is not an allowed model class (:func:`check_model_targets`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: checkpoint file is empty (0 bytes); use another checkpoint of the run")
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # RuntimeError, EOFError, UnpicklingError, ... from a damaged or unsafe file
        if "TorchScript archives" in str(exc):
            raise ValueError(f"{path} is an exported TorchScript model, not a pyg_equireann training checkpoint "
                             "(no state_dict and model_config)") from exc
        raise _load_error(path, size, exc) from exc
    config = (checkpoint.get("hyper_parameters") or {}).get("model_config") if isinstance(checkpoint, dict) else None
    if config is None or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a pyg_equireann training checkpoint (no state_dict and model_config)")
    config = checkpoint["hyper_parameters"]["model_config"] = upgrade_targets(config)
    check_model_targets(config, path)
    return checkpoint


# ---------------------------------------------------------------------------------------- model allow-list
#: Hydra ``_target_``s that a model config read from a file may name (the models of ``conf/model/`` and
#: their parts), both as the configs spell them and as ``module.qualname``. Anything else could run code
#: when instantiated (``_target_: os.system``), so it needs :func:`register_model_class`.
_ALLOWED_TARGETS = {
    "pyg_equireann.EquiREANN", "pyg_equireann.models.equireann.EquiREANN",
    "pyg_equireann.REANN", "pyg_equireann.models.reann.REANN",
    "pyg_equireann.models.pyg.DimeNetPlusPlusPotential",
    "pyg_equireann.models.pyg.ViSNetPotential",
    "pyg_equireann.models.pyg.RadiusInteractionGraph",
    "pyg_equireann.models.mace.MACEPotential",
    "torch_geometric.nn.SchNet", "torch_geometric.nn.models.SchNet", "torch_geometric.nn.models.schnet.SchNet",
}
#: Module paths before the package was split into nn/, graph/, models/, training/, deploy/ (0.1.0): old
#: checkpoints and run folders name their classes there; :func:`upgrade_targets` reads them as the new names.
LEGACY_MODULES = {
    "pyg_equireann.equireann": "pyg_equireann.models.equireann",
    "pyg_equireann.reann": "pyg_equireann.models.reann",
    "pyg_equireann.pyg_compat": "pyg_equireann.models.pyg",
    "pyg_equireann.mace_compat": "pyg_equireann.models.mace",
    "pyg_equireann.callbacks": "pyg_equireann.training.callbacks",
    "pyg_equireann.checkpoint": "pyg_equireann.training.checkpoint",
    "pyg_equireann.lightning": "pyg_equireann.training.module",
    "datamodules": "pyg_equireann.datamodules",
}


def upgrade_targets(config: Any) -> Any:
    """A copy of ``config`` with every ``_target_`` in an old module path (:data:`LEGACY_MODULES`) renamed."""
    if isinstance(config, list):
        return [upgrade_targets(v) for v in config]
    if not isinstance(config, Mapping):
        return config
    out = {k: upgrade_targets(v) for k, v in config.items()}
    target = out.get("_target_")
    if isinstance(target, str):
        module, _, name = target.rpartition(".")
        for old, new in LEGACY_MODULES.items():
            if module == old or module.startswith(old + "."):
                out["_target_"] = f"{new}{module[len(old):]}.{name}"
                break
    return out


#: Hydra keys with a meaning for ``instantiate`` other than ``_target_``: never in a saved model config.
_HYDRA_KEYS = ("_args_", "_partial_", "_recursive_", "_convert_")


def register_model_class(target: "type | str"):
    """Allow a model class of your own (or its dotted ``_target_`` name) in model configs read from
    checkpoints: ``register_model_class(MyModel)`` before ``PotentialModule.from_checkpoint`` or the
    ASE calculator. Only register classes whose constructor you trust: a checkpoint can call it with any
    arguments. Returns ``target``, so it also works as a class decorator. For the command-line tools, list
    the dotted names in the environment variable ``PYG_EQUIREANN_ALLOWED_MODELS`` (comma-separated)."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, type):
        name = f"{target.__module__}.{target.__qualname__}"
    else:
        raise TypeError(f"register_model_class takes a class or a dotted name, got {type(target).__name__}")
    _ALLOWED_TARGETS.add(name)
    return target


def _allowed_names() -> set:
    extra = os.environ.get("PYG_EQUIREANN_ALLOWED_MODELS", "")
    return _ALLOWED_TARGETS | {n.strip() for n in extra.split(",") if n.strip()}


def _allowed_target(name: str) -> bool:
    allowed = _allowed_names()
    if name in allowed:
        return True
    # another spelling of an allowed class (``mypkg.MyModel`` for ``mypkg.models.MyModel``): resolved only
    # through modules that are already imported, so checking a name never imports (runs) anything
    module, _, attr = name.rpartition(".")
    while module and module not in sys.modules:
        module, _, head = module.rpartition(".")
        attr = f"{head}.{attr}"
    if not module:
        return False
    obj = sys.modules[module]
    for part in attr.split("."):
        obj = inspect.getattr_static(obj, part, None)
    return isinstance(obj, type) and f"{obj.__module__}.{obj.__qualname__}" in allowed


def check_model_targets(config: Any, source: "str | os.PathLike") -> None:
    """ValueError naming ``source`` (the file) unless the model config ``config`` is safe to pass to
    Hydra's ``instantiate``: every ``_target_`` (also nested, also in lists) an allowed model class
    (:func:`register_model_class`), no ``_args_``/``_partial_``/``_recursive_``/``_convert_`` and no
    ``${...}`` interpolation (a resolver such as ``oc.decode`` could create new targets); values plain
    Python (str, int, float, bool, None, lists, dicts)."""
    def fail(where: str, what: str):
        raise ValueError(f"{source}: model config entry {where}: {what}; a model config read from a file may only "
                         "name pyg_equireann's model classes (allow your own with pyg_equireann.training.checkpoint."
                         "register_model_class or PYG_EQUIREANN_ALLOWED_MODELS=pkg.module.Class)")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if not isinstance(key, str):
                    fail(where or "(top level)", f"non-string key {key!r}")
                here = f"{where}.{key}" if where else key
                if key in _HYDRA_KEYS:
                    fail(here, f"Hydra's {key} is not allowed")
                if key == "_target_":
                    if not isinstance(value, str):
                        fail(here, f"a {type(value).__name__}, not a dotted class name")
                    if not _allowed_target(value):
                        fail(here, f"{value!r} is not an allowed model class")
                walk(value, here)
        elif isinstance(node, (list, tuple)):
            for k, value in enumerate(node):
                walk(value, f"{where}[{k}]")
        elif isinstance(node, str):
            if "${" in node:
                fail(where, f"interpolation {node!r} is not allowed")
        elif node is not None and not isinstance(node, (bool, int, float)):
            fail(where, f"a {type(node).__name__}, not a plain value")

    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ValueError(f"{source}: the model config has no _target_ (got {type(config).__name__}); "
                         "it is not a pyg_equireann training checkpoint")
    walk(config, "")


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


#: Model settings that change how a model runs, not what it computes: a run may resume with other values.
EXECUTION_KEYS = ("compile",)


def model_config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> List[str]:
    """``["key: checkpoint X, requested Y", ...]`` for the entries of two model configs that differ
    (floats compared to 1e-9 relative). How the model runs (:data:`EXECUTION_KEYS`) may differ."""
    missing = object()
    out = []
    for key in sorted((set(saved) | set(requested)) - set(EXECUTION_KEYS), key=str):
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
