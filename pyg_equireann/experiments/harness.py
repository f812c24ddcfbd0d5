"""Equal-budget training of several models: the one harness of ``equireann-bench bench=accuracy`` and
``equireann-nonlocal``.

Each run is a train config (the keys of ``conf/train.yaml``: ``model``, ``data``, ``module``, ``trainer``,
``logger``, ``callbacks``, ``budget``, ``seed``, ``float64``, ``test``, …) trained into its own folder by the
code of ``equireann-train`` (:func:`~pyg_equireann.training.runs.train`), so
every model gets the same data, split, loss, optimiser, budget and outputs: ``config_resolved.yaml``,
``checkpoints/{best,last}.ckpt``, ``logs/metrics.csv``, ``snapshots/`` (budget snapshots),
``learning_curve.png``, ``train_summary.json`` and, with ``test: true``, ``test_metrics.json``.

Runs are trained in process, not as ``equireann-train`` subprocesses: a run is a composed config, not a
command line (the non-local suite's models are config nodes with per-model changes that no override
list expresses), and runs in one process can share a data module (the cumulene data processed once).
``jobs >= 1`` trains each run in a fresh spawned worker process instead, ``jobs`` at a time: each run then
has its own torch threads, its own ``process`` budget clock (CPU time of the whole process, which
concurrent runs in one process would share) and its own memory, and a crashing run cannot take the
others down. A config composed with its ``hydra`` node (:func:`compose` with ``return_hydra_config``) runs
as ``equireann-train`` with those overrides would: ``${hydra:...}`` resolves to the run folder and the
overrides count as given on the command line (e.g. an explicit ``trainer.max_epochs`` stays a cap under
a budget).
"""
import contextlib
import copy
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def compose(config_name: Optional[str], overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` composed by Hydra with ``overrides``: through the running Hydra app when
    there is one (``hydra.compose``), else in a temporary ``initialize_config_dir`` context."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pyg_equireann.config import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def model_configs(names: Sequence[str], overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
                  ) -> Dict[str, Dict[str, Any]]:
    """Model configs ``conf/model/<name>.yaml`` as Hydra composes them (``+model=<name>``), resolved, with
    per-model changes ``overrides[name]`` merged in."""
    from hydra.errors import MissingConfigException

    configs = {}
    for name in names:
        try:
            cfg = compose(None, [f"+model={name}"]).model
        except MissingConfigException as error:
            raise ValueError(f"unknown model {name!r}: no conf/model/{name}.yaml; available: {error.options}") from None
        if name in (overrides or {}):
            cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(overrides[name])))
        configs[name] = OmegaConf.to_container(cfg, resolve=True)
    return configs


@contextlib.contextmanager
def _hydra_config(cfg: DictConfig, run_dir: Path):
    """Make ``cfg.hydra`` (with its output folder set to ``run_dir``) the current HydraConfig, if ``cfg`` has one."""
    from hydra.core.hydra_config import HydraConfig

    if "hydra" not in cfg:
        yield
        return
    hydra_cfg = copy.deepcopy(cfg)  # keeps the node's HydraConf type, which set_config checks
    with open_dict(hydra_cfg):
        hydra_cfg.hydra.runtime.output_dir = str(run_dir)
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(hydra_cfg)
    try:
        yield
    finally:
        instance.cfg = previous


def job_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The resolved config of one run (no ``hydra`` node) with its checkpoints and logs in ``run_dir``."""
    job = OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                                  resolve=True))
    if (job.get("callbacks") or {}).get("checkpoint"):
        job.callbacks.checkpoint.dirpath = str(run_dir / "checkpoints")
    for logger_cfg in (job.get("logger") or {}).values():
        logger_cfg.save_dir = str(run_dir)
    return job


def _finished(run_dir: Path, test: bool) -> bool:
    return (run_dir / "train_summary.json").is_file() and (not test or (run_dir / "test_metrics.json").is_file())


def _read_results(run_dir: Path) -> Dict[str, Any]:
    result: Dict[str, Any] = {"run_dir": str(run_dir)}
    for name in ("train_summary.json", "test_metrics.json"):
        if (run_dir / name).is_file():
            result.update(json.loads((run_dir / name).read_text()))
    return result


def train_run(cfg: DictConfig, run_dir: Path, datamodule=None, resume: bool = False) -> Dict[str, Any]:
    """Train the model of the train config ``cfg`` into ``run_dir`` and test its best checkpoint.

    ``datamodule``: an already set-up data module of ``cfg.data`` (shared by several runs), else one is
    built. ``resume``: a run folder that already holds a finished run is read, not retrained. Returns
    ``train_summary.json`` (model class, parameters, epochs, steps, ``fit_wall_seconds``,
    ``fit_cpu_seconds``, ``checkpoint``: the best checkpoint or ``""``, and with a budget
    ``training_minutes``, ``budget_minutes``, ``budget_clock``), the test metrics and ``run_dir``."""
    from pyg_equireann.training.runs import train

    run_dir = Path(run_dir)
    if resume and _finished(run_dir, bool(cfg.get("test"))):
        return _read_results(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _hydra_config(cfg, run_dir):
        job = job_config(cfg, run_dir)
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(job))
        result = train(job, run_dir, datamodule=datamodule)
    log.info("%s: %d epochs in %.0f s (CPU %.0f s)", run_dir.name, result.summary["epochs"],
             result.summary["fit_wall_seconds"], result.summary["fit_cpu_seconds"])
    return {"run_dir": str(run_dir), **result.summary, **result.results}  # what _read_results reads back


def _worker(cfg: DictConfig, run_dir: str, threads: Optional[int], resume: bool) -> Dict[str, Any]:
    """:func:`train_run` in a spawned worker process, its output in ``<run_dir>/stdout.log``."""
    import torch
    from hydra.core.utils import setup_globals

    from pyg_equireann.config import register_resolvers

    setup_globals()  # Hydra's resolvers (hydra:, now:), as in the parent
    register_resolvers()
    if threads:
        torch.set_num_threads(threads)
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "stdout.log", "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        return train_run(cfg, path, resume=resume)


def train_models(runs: Mapping[str, DictConfig], out_dir: Path, jobs: int = 0, threads: Optional[int] = None,
                 resume: bool = False, datamodule=None, record_errors: bool = False,
                 progress: bool = True) -> Dict[str, Dict[str, Any]]:
    """Train every run (``{name: train config}``) into ``out_dir/<name>``; returns ``{name: result}``
    (:func:`train_run`; with ``record_errors`` a failed run gives ``{"error": ..., "run_dir": ...}`` instead
    of raising).

    ``jobs = 0``: one after another in this process, sharing ``datamodule`` (a set-up data module of every
    run's data config; none: each run builds its own); ``jobs >= 1``: each run in a fresh spawned process,
    ``jobs`` at a time, with ``threads`` torch threads each."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    results: Dict[str, Dict[str, Any]] = {}

    def record(name: str, error: BaseException) -> None:
        if not record_errors:
            raise error
        log.warning("%s failed: %s: %s", name, type(error).__name__, error)
        results[name] = {"error": f"{type(error).__name__}: {error}".strip(), "run_dir": str(out_dir / name)}

    if jobs <= 0:
        for name, cfg in tqdm(runs.items(), desc="training", disable=not progress):
            try:
                results[name] = train_run(cfg, out_dir / name, datamodule, resume)
            except Exception as error:  # recorded or re-raised by record()
                record(name, error)
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        for name, cfg in runs.items():
            if resume and _finished(out_dir / name, bool(cfg.get("test"))):
                results[name] = _read_results(out_dir / name)
        futures = {pool.submit(_worker, cfg, str(out_dir / name), threads, resume): name
                   for name, cfg in runs.items() if name not in results}
        for future in tqdm(futures, desc="training", disable=not progress):
            name = futures[future]
            try:
                results[name] = future.result()
            except Exception as error:  # a worker that died (BrokenProcessPool) included
                record(name, error)
    return {name: results[name] for name in runs}
