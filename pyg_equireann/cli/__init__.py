"""Command-line entry points: ``equireann-train``, ``-eval``, ``-export``, ``-bench``, ``-nonlocal`` (Hydra
apps). :func:`hydra_entry` and :func:`user_errors` give them one error policy: bad input, a mistyped
override and an unwritable output folder end the command with a one-line message and exit code 2."""
import contextlib
import difflib
import functools
import logging
import os
import re
import sys


from pyg_equireann import config
from pyg_equireann.config import CONF_DIR, check_writable, config_keys

__all__ = ["CONF_DIR", "check_writable", "hydra_entry", "user_errors", "register_resolvers"]

register_resolvers = config.register_resolvers


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
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(error, InterpolationResolutionError):  # a resolver's error (${lr_scheduler:...}): its message
        cause = next((e for e in _chain(error) if not isinstance(e, InterpolationResolutionError)), None)
        message = _user_error_message(cause) if cause is not None else None
        if message is not None:
            return f"{error.full_key}: {message}" if getattr(error, "full_key", None) else message
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
