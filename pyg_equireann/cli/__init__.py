"""Command-line entry points: ``equireann-train``, ``-eval``, ``-export``, ``-bench``, ``-nonlocal`` (Hydra
apps). :func:`hydra_entry` and :func:`user_errors` give them one error policy: bad input, a mistyped
override and an unwritable output folder end the command with a one-line message and exit code 2."""
import contextlib
import datetime
import difflib
import functools
import importlib.resources
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = str(Path(importlib.resources.files("pyg_equireann.conf")))  # conf/ in a checkout, inside the wheel installed


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
    """The model cutoff (Å) of a checkpoint, read safely (:func:`~pyg_equireann.training.checkpoint.read_checkpoint`)."""
    from pyg_equireann.training.checkpoint import read_checkpoint

    cutoff = read_checkpoint(ckpt_path)["hyper_parameters"]["model_config"].get("cutoff", 5.0)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)):
        raise ValueError(f"{ckpt_path}: model config entry cutoff is {cutoff!r}, not a number")
    return float(cutoff)


def _data_root() -> str:
    """``${data_root:}``: :func:`~pyg_equireann.datamodules.base.default_data_root`."""
    from pyg_equireann.datamodules.base import default_data_root

    return str(default_data_root())


def register_resolvers() -> None:
    resolvers = {
        "resume_dir": _resume_dir,
        "run_dir": _run_dir,
        "new_dir": _new_dir,
        "record_subdir": _record_subdir,
        "data_root": _data_root,
        # run folders recorded before ${data_root:} name ${project_root:}/data: the same folder
        "project_root": lambda: str(Path(_data_root()).parent),
        "dtype": lambda float64: "float64" if float64 else "float32",
        "ckpt_cutoff": _ckpt_model_cutoff,
        # a resumed run logs into a new folder so the first part's metrics.csv is kept
        "log_version": lambda ckpt_path: "logs" if ckpt_path in (None, "", "None", "null") else
        "logs_resumed_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
    }
    # cached: one value per composed config, however often Hydra and Lightning read it (folders are created once)
    cached = {"run_dir", "new_dir", "record_subdir", "log_version"}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name in cached)


register_resolvers()


#: marks ``HYDRA_FULL_ERROR=1`` as set by :func:`hydra_entry` (not by the user) around Hydra's start-up; an
#: environment variable, so that jobs that launchers start in other processes see it too
_SET_HERE = "PYG_EQUIREANN_FULL_ERROR_SET_HERE"


def _full_error_set_here() -> bool:
    return os.environ.get(_SET_HERE) == "1"


def _user_wants_traceback() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and not _full_error_set_here()


def _restore_full_error() -> None:
    if _full_error_set_here():
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.pop(_SET_HERE, None)


def _log_to_files(level: int, message: str, exc_info=None) -> None:
    """``message`` (and the traceback of ``exc_info``) into the log files of the root logger only (Hydra's
    ``<job>.log`` in the run folder), not onto the terminal, where the same text is printed once already."""
    record = logging.getLogger("pyg_equireann.cli").makeRecord(
        "pyg_equireann.cli", level, __file__, 0, message, (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _user_error_message(error: BaseException) -> "str | None":
    """The message of an error caused by the user's input (a missing file, key or value, an unwritable
    folder, also when Hydra's ``instantiate`` wraps it, or a mandatory config value left unset), else None."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(error, (FileNotFoundError, KeyError, ValueError, PermissionError)):
        return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        return _user_error_message(error.__cause__)
    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "a value"
        return f"{key} is not set (??? in the config): give it on the command line, e.g. {key}=..."
    return None


@contextlib.contextmanager
def user_errors():
    """Bad input (missing file, key or value, unwritable folder) ends the command with its message and exit
    code 2 instead of a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback. The message (or, for any other
    error, the traceback) is also written into the run's log file (``train.log``)."""
    _restore_full_error()  # the task runs: from here on Hydra reports errors as the user asked
    try:
        yield
    except Exception as error:
        message = _user_error_message(error)
        if message is None or _user_wants_traceback():
            _log_to_files(logging.ERROR, "failed", exc_info=sys.exc_info())
            raise
        _log_to_files(logging.ERROR, f"error: {message}")
        print(f"error: {message}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


def check_writable(folder, what: str = "output folder") -> Path:
    """``PermissionError`` naming ``folder`` unless a file can be created in it or, for a folder that does
    not exist yet, in its nearest existing parent (probed by creating a file: permission bits, read-only
    file systems and immutable folders all count, also for root). Returns the folder."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PermissionError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == path else f" (in {existing}, where it would be created)"
        raise PermissionError(f"{what} {path} is not writable{where}: {error.strerror or error}") from None
    return path


# --------------------------------------------------------------------------- errors before the task starts


def hydra_entry(config_name: str):
    """``@hydra.main`` for ``conf/<config_name>.yaml``, for the console scripts: errors before the task runs
    (a mistyped key or config choice, a bad override, an output folder Hydra cannot create or write)
    end the command with one line, a suggestion where one fits, and exit code 2, instead of Hydra's
    message (whose advice ``+key=value`` adds the mistyped key). Works by letting such errors reach here
    (``HYDRA_FULL_ERROR=1`` until :func:`user_errors` starts the task); ``HYDRA_FULL_ERROR=1`` set by the
    user keeps Hydra's behaviour."""
    import hydra

    def decorate(task):
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)
        return _catch_startup_errors(hydra_main, config_name)

    return decorate


def _catch_startup_errors(hydra_main, config_name: str):
    @functools.wraps(hydra_main)
    def main(*args, **kwargs):
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if os.environ.get("HYDRA_FULL_ERROR") != "1":
            os.environ.update({"HYDRA_FULL_ERROR": "1", _SET_HERE: "1"})
        try:
            return hydra_main(*args, **kwargs)
        except (HydraException, OmegaConfBaseException, OSError, ValueError) as error:
            if not _full_error_set_here():
                raise
            _restore_full_error()
            message = startup_error_message(error, config_name, sys.argv[1:])
            if message is None:
                raise
            print(f"error: {message}\n(set HYDRA_FULL_ERROR=1 for Hydra's message)", file=sys.stderr)
            sys.exit(2)
        finally:
            _restore_full_error()

    return main


def startup_error_message(error: BaseException, config_name: str, argv) -> "str | None":
    """One line for an error raised while Hydra composes the config and prepares the run folder, or
    ``None`` for errors that are not the user's (left as tracebacks)."""
    from hydra.errors import MissingConfigException

    overrides = [a for a in argv if not a.startswith("-")]
    if isinstance(error, MissingConfigException) and getattr(error, "missing_cfg_file", None):
        group, _, choice = str(error.missing_cfg_file).rpartition("/")
        options = list(error.options or [])
        if group and options:
            close = difflib.get_close_matches(choice, options, n=1, cutoff=0.5)
            hint = f"did you mean {group}={close[0]}? " if close else ""
            return f"no config {choice!r} in group {group}: {hint}(choices: {', '.join(options)})"
        return _one_line(error)
    match = re.match(r"Could not override '([^']+)'", str(error))
    if match:
        return override_typo_message(match.group(1), config_name, overrides)
    os_error = next((e for e in _chain(error) if isinstance(e, OSError)), None)
    if os_error is not None and os_error.filename:
        return f"the output folder is not writable: cannot create {os_error.filename} ({os_error.strerror or os_error})"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return _one_line(error)
    return None


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def override_typo_message(key: str, config_name: str, overrides) -> str:
    """``Could not override 'model.cutof'`` → ``... did you mean model.cutoff=3?``: the closest key of the
    config composed with the other overrides' group choices (or a config group, for ``modl=reann``)."""
    value = next((o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == key), None)
    keys, groups = config_keys(config_name, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
    candidates = keys + ([g for g in groups if "/" not in g] if "." not in key else [])
    close = suggest_key(key, candidates)
    prefix = f"Could not override {key!r}: no such key"
    if close:
        return f"{prefix}; did you mean {close}{'' if value is None else '=' + value}?"
    parent = key.rpartition(".")[0]
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    if siblings:
        return f"{prefix}; the keys of {parent or 'the top level'} are: {', '.join(siblings)}"
    return prefix


def suggest_key(key: str, candidates) -> "str | None":
    """The candidate closest to ``key`` (a dotted path): first among keys of the same parent node, then
    among all; ``None`` if nothing is close."""
    parent = key.rpartition(".")[0]
    same_parent = [c for c in candidates if c.rpartition(".")[0] == parent]
    for pool in (same_parent, candidates):
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def config_keys(config_name: str, overrides):
    """(every dotted key of ``conf/<config_name>.yaml`` composed with those ``overrides`` that compose,
    Hydra's keys included; the config groups)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    cfg = None
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for attempt in (list(overrides), [o for o in overrides if "." not in o.split("=", 1)[0]], []):
            try:
                cfg = compose(config_name, overrides=attempt, return_hydra_config=True)
                break
            except Exception:  # noqa: BLE001 - a sweep or another bad override: fewer overrides
                continue
    GlobalHydra.instance().clear()
    if cfg is None:
        return [], []
    groups = list(cfg.hydra.runtime.choices.keys())
    keys = []

    def walk(node, prefix):
        for name in node.keys() if hasattr(node, "keys") else []:
            path = f"{prefix}{name}"
            keys.append(path)
            child = node._get_node(name)
            if hasattr(child, "keys") and not child._is_missing() and not child._is_none():
                walk(child, path + ".")

    walk(cfg, "")
    return keys, groups
