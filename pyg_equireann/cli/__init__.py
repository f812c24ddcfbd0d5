"""Command-line entry points: ``equireann-train`` and ``equireann-eval`` (Hydra apps)."""
import contextlib
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(PROJECT_ROOT / "conf")


def _resume_dir(ckpt_path, default):
    """Run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` → ``<run>``), else ``default``."""
    if ckpt_path in (None, "", "None", "null"):
        return default
    path = Path(str(ckpt_path)).expanduser().resolve()
    return str(path.parent.parent if path.parent.name == "checkpoints" else path.parent)


def _ckpt_model_cutoff(ckpt_path):
    """The model cutoff (Å) of a checkpoint, read safely (:func:`~pyg_equireann.checkpoint.read_checkpoint`)."""
    from ..checkpoint import read_checkpoint

    cutoff = read_checkpoint(ckpt_path)["hyper_parameters"]["model_config"].get("cutoff", 5.0)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)):
        raise ValueError(f"{ckpt_path}: model config entry cutoff is {cutoff!r}, not a number")
    return float(cutoff)


def register_resolvers() -> None:
    resolvers = {
        "resume_dir": _resume_dir,
        "project_root": lambda: str(PROJECT_ROOT),
        "dtype": lambda float64: "float64" if float64 else "float32",
        "ckpt_cutoff": _ckpt_model_cutoff,
        # a resumed run logs into a new folder so the first part's metrics.csv is kept
        "log_version": lambda ckpt_path: "logs" if ckpt_path in (None, "", "None", "null") else
        "logs_resumed_" + __import__("datetime").datetime.now().strftime("%Y%m%d-%H%M%S"),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


@contextlib.contextmanager
def user_errors():
    """Bad input (missing file, key or value) ends the command with its message and exit code 2
    instead of a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    try:
        yield
    except (FileNotFoundError, KeyError, ValueError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
