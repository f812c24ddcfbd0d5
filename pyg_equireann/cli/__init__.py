"""Command-line entry points: ``equireann-train`` and ``equireann-eval`` (Hydra apps)."""
import contextlib
import datetime
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


def _new_dir(base, name) -> str:
    """Create ``base/name`` atomically (``os.mkdir``) and return it; ``base/name-2``, ``-3``, ... if it exists,
    so that runs started in the same second (or resumed twice in one) never share a folder."""
    base = Path(str(base))
    base.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        folder = base / (name if k == 1 else f"{name}-{k}")
        try:
            os.mkdir(folder)
            return str(folder)
        except FileExistsError:
            k += 1


def _run_dir(ckpt_path, base, name):
    """``hydra.run.dir``: the run folder of ``ckpt_path`` (resume), else a new folder ``base/name[-k]``."""
    if ckpt_path in (None, "", "None", "null"):
        return _new_dir(base, name)
    return _resume_dir(ckpt_path, None)


def _record_subdir(output_dir):
    """``hydra.output_subdir``: ``.hydra`` in a new folder; ``resumes/<time>`` in a folder that already holds
    a run's record (a resume), which is never overwritten."""
    if not (Path(str(output_dir)) / ".hydra" / "config.yaml").exists():
        return ".hydra"
    resumes = Path(str(output_dir)) / "resumes"
    return str(Path(_new_dir(resumes, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))).relative_to(output_dir))


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
        "run_dir": _run_dir,
        "record_subdir": _record_subdir,
        "project_root": lambda: str(PROJECT_ROOT),
        "dtype": lambda float64: "float64" if float64 else "float32",
        "ckpt_cutoff": _ckpt_model_cutoff,
        # a resumed run logs into a new folder so the first part's metrics.csv is kept
        "log_version": lambda ckpt_path: "logs" if ckpt_path in (None, "", "None", "null") else
        "logs_resumed_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
    }
    # cached: one value per composed config, however often Hydra and Lightning read it (folders are created once)
    cached = {"run_dir", "record_subdir", "log_version"}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name in cached)


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
