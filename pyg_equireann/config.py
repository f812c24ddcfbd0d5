"""Configs of the package: where ``conf/`` is, the resolvers its configs use (run folders, records,
checkpoint values, the learning-rate schedule), the writability check of output folders, and the keys of a
composed config."""
import datetime
import importlib.resources
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(importlib.resources.files("pyg_equireann.conf")))  # conf/ in a checkout, inside the wheel installed


def resume_dir(ckpt_path, default):
    """Run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` → ``<run>``), else ``default``."""
    if ckpt_path in (None, "", "None", "null"):
        return default
    path = Path(str(ckpt_path)).expanduser().resolve()
    return str(path.parent.parent if path.parent.name == "checkpoints" else path.parent)


def new_dir(base, name) -> str:
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


def run_dir(ckpt_path, base, name):
    """``hydra.run.dir``: the run folder of ``ckpt_path`` (resume), else a new folder ``base/name[-k]``."""
    if ckpt_path in (None, "", "None", "null"):
        return new_dir(base, name)
    return resume_dir(ckpt_path, None)


def record_subdir(output_dir):
    """``hydra.output_subdir``: ``.hydra`` in a new folder; ``resumes/<time>`` in a folder that already holds
    a run's record (a resume), which is never overwritten."""
    if not (Path(str(output_dir)) / ".hydra" / "config.yaml").exists():
        return ".hydra"
    resumes = Path(str(output_dir)) / "resumes"
    return str(Path(new_dir(resumes, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))).relative_to(output_dir))


def ckpt_model_cutoff(ckpt_path):
    """The model cutoff (Å) of a checkpoint, read safely (:func:`~pyg_equireann.training.checkpoint.read_checkpoint`)."""
    from pyg_equireann.training.checkpoint import read_checkpoint

    cutoff = read_checkpoint(ckpt_path)["hyper_parameters"]["model_config"].get("cutoff", 5.0)
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)):
        raise ValueError(f"{ckpt_path}: model config entry cutoff is {cutoff!r}, not a number")
    return float(cutoff)


def log_version(ckpt_path) -> str:
    """The CSV logger's folder: ``logs``; ``logs_resumed_<time>`` for a resumed run, so that the first part's
    ``metrics.csv`` is kept."""
    if ckpt_path in (None, "", "None", "null"):
        return "logs"
    return "logs_resumed_" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def data_root() -> str:
    """``${data_root:}``: :func:`~pyg_equireann.datamodules.base.default_data_root`."""
    from pyg_equireann.datamodules.base import default_data_root

    return str(default_data_root())


def lr_scheduler(*args) -> "DictConfig | None":
    """``${lr_scheduler:...}``: :func:`~pyg_equireann.training.optim.scheduler_config` as a DictConfig, not a dict
    (``OmegaConf.resolve``, ``--cfg job --resolve``, replaces nodes only by containers)."""
    from pyg_equireann.training.optim import scheduler_config  # imports torch: only when a config is resolved

    config = scheduler_config(*args)
    return None if config is None else OmegaConf.create(config)


def register_resolvers() -> None:
    """The resolvers of ``conf/``."""
    resolvers = {
        "data_root": data_root,
        # run folders recorded before ${data_root:} name ${project_root:}/data: the same folder
        "project_root": lambda: str(Path(data_root()).parent),
        "resume_dir": resume_dir,
        "run_dir": run_dir,
        "new_dir": new_dir,
        "record_subdir": record_subdir,
        "dtype": lambda float64: "float64" if float64 else "float32",
        "ckpt_cutoff": ckpt_model_cutoff,
        "log_version": log_version,
        "lr_scheduler": lr_scheduler,
    }
    # cached: one value per composed config, however often Hydra and Lightning read it (folders are created once)
    cached = {"run_dir", "new_dir", "record_subdir", "log_version"}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name in cached)


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


def check_output_folders(cfg: DictConfig, out_dir: Path) -> None:
    """``PermissionError`` naming the first folder this run would write that is not writable: the run
    folder, the checkpoint folder(s), the loggers' folders and the budget's snapshot folder, checked
    before any data is read rather than when the first checkpoint is saved."""
    folders = {"run folder": out_dir}
    for name, node in list((cfg.get("callbacks") or {}).items()) + list((cfg.get("logger") or {}).items()):
        for key in ("dirpath", "save_dir"):
            if (node or {}).get(key):
                folders[f"{name} folder ({key})"] = Path(str(node[key]))
    budget = (cfg.get("callbacks") or {}).get("budget") or {}
    if budget.get("minutes") and budget.get("snapshots"):
        folders["snapshot folder"] = Path(str(budget.get("snapshot_dir") or out_dir / "snapshots"))
    for what, folder in folders.items():
        check_writable(folder, what)


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
