"""A training run's folder and records: the config it runs with (a resume: the run's recorded config,
:func:`resume_config`), the record of each start (:func:`write_config_record`, :func:`write_run_info`) and
the check that its output folders are writable, and the run itself (:func:`train`). Layout:
:mod:`pyg_equireann.cli.train`."""
import datetime
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pyg_equireann.config import CONF_DIR, resume_dir
from pyg_equireann.training.callbacks import EpochLog, training_budget
from pyg_equireann.training.checkpoint import _allowed_target, check_model_config, read_checkpoint, upgrade_targets
from pyg_equireann.training.plots import learning_curve
from pyg_equireann.training.prepare import build_module, build_trainer, prepare_model_config

log = logging.getLogger("equireann-train")

#: keys that a resume may change on the command line without making it another experiment (prefixes)
RESUME_HARMLESS = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.min_epochs",
                   "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
                   "num_threads", "test", "budget.minutes", "budget.epochs", "logger")
_UNSET = object()


def _leaves(node: Any, path=()) -> Dict[tuple, Any]:
    """``{("data", "batch_size"): 5, ...}`` for a config container (unresolved); empty dicts are leaves."""
    if isinstance(node, dict) and node:
        return {k: v for key, child in node.items() for k, v in _leaves(child, (*path, key)).items()}
    return {path: node}


def _set_leaf(container: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(container.get(key), dict):
            container[key] = {}
        container = container[key]
    if value is _UNSET:
        container.pop(path[-1], None)
    else:
        container[path[-1]] = value


def _harmless(key: tuple) -> bool:
    name = ".".join(map(str, key))
    return any(name == h or name.startswith(h + ".") for h in RESUME_HARMLESS)


def _run_overrides(overrides) -> List[str]:
    """The command-line overrides that configure the run (without ``hydra.*``, ``ckpt_path``, ``resume_overrides``)."""
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")
    return [o for o in overrides if key(o) not in ("ckpt_path", "resume_overrides") and not key(o).startswith("hydra")]


#: Hydra keys that make ``instantiate`` build or call something.
_BUILD_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def _conf_targets() -> set:
    """Every ``_target_`` named in the package's own configs (``conf/``)."""
    names = set()
    for path in Path(CONF_DIR).rglob("*.yaml"):
        names.update(re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), flags=re.M))
    return names


def check_recorded_config(run_dir: Path, recorded: Any, original: List[str], ours: List[str]) -> None:
    """A run folder is as untrusted as a checkpoint (it may come from someone else): ``ValueError`` unless every
    object that the run's config record (``recorded``, ``original`` overrides) builds is one that the package's
    configs name or an allowed model class (:func:`~pyg_equireann.training.checkpoint.register_model_class`), or is
    repeated on this command line (``ours``); resolvers that create config nodes (``oc.decode``, ``oc.create``)
    likewise."""
    known, repeated = _conf_targets(), {o.lstrip("+~") for o in ours}
    unsafe = lambda text: any(k in text for k in _BUILD_KEYS) or "oc.decode" in text or "oc.create" in text  # noqa: E731
    bad = [o.lstrip("+~") for o in original if unsafe(o) and o.lstrip("+~") not in repeated]

    def allowed(target: Any) -> bool:
        return isinstance(target, str) and (target in known or _allowed_target(target))

    def walk(node: Any, where: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            here = f"{where}.{key}" if where and isinstance(key, str) else f"{where}[{key}]" if where else str(key)
            item = f"{here}={value}"
            if key == "_target_" and allowed(value):
                pass
            elif key == "_partial_" and value is True and allowed(node.get("_target_")):
                pass  # a known class or function, called later (optimizer(params))
            elif (key in _BUILD_KEYS or (isinstance(value, str) and unsafe(value))) and item not in repeated:
                bad.append(item)
            walk(value, here)

    walk(recorded, "")
    if bad:
        raise ValueError(
            f"{run_dir}: the run's config record builds objects that pyg_equireann's configs do not name: "
            + ", ".join(sorted(set(bad))) + ". A run folder is read like a checkpoint, so only known classes are "
            "built; if you trust it, repeat these overrides on the command line")


def recorded_run(ckpt_path) -> Optional[Path]:
    """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt``) if it holds the run's config record."""
    if ckpt_path in (None, "", "None", "null"):
        return None
    run_dir = Path(resume_dir(ckpt_path, None))
    return run_dir if (run_dir / ".hydra" / "config.yaml").is_file() else None


def resume_config(cfg: DictConfig) -> DictConfig:
    """The config to run: ``cfg`` for a new run or a checkpoint outside a run folder; for a checkpoint of a run
    folder the run's recorded config (``.hydra/config.yaml``) with the changes of this command's overrides.
    ``ValueError`` listing each change (key, run's value, command line's value) that is not harmless
    (:data:`RESUME_HARMLESS`) unless ``resume_overrides=allow``. Keys added to ``conf/`` since the run get
    their defaults."""
    run_dir = recorded_run(cfg.get("ckpt_path"))
    if run_dir is None:
        return cfg
    policy = cfg.get("resume_overrides", "refuse")
    if policy not in ("refuse", "allow"):
        raise ValueError(f"resume_overrides must be 'refuse' or 'allow', not {policy!r}")
    hydra_cfg = HydraConfig.get()
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    original = _run_overrides(OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else [])
    ours = _run_overrides(hydra_cfg.overrides.task)
    recorded = upgrade_targets(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml")))
    check_recorded_config(run_dir, recorded, original, ours)
    # what this command's overrides change, composed both ways with today's conf/
    before = _leaves(OmegaConf.to_container(compose(hydra_cfg.job.config_name, overrides=original)))
    after = _leaves(OmegaConf.to_container(compose(hydra_cfg.job.config_name, overrides=original + ours)))
    changes = {k: after.get(k, _UNSET) for k in {*before, *after} if before.get(k, _UNSET) != after.get(k, _UNSET)}
    leaves = _leaves(recorded)
    refused = sorted((k for k in changes if not _harmless(k)), key=str)
    if refused and policy != "allow":
        subdir = hydra_cfg.output_subdir  # a refused resume leaves no record
        if subdir and Path(subdir).parts[0] == "resumes":
            shutil.rmtree(Path(hydra_cfg.runtime.output_dir) / subdir, ignore_errors=True)
        show = lambda v: "(not set)" if v is _UNSET else repr(v)  # noqa: E731
        lines = [f"  {'.'.join(map(str, k))}: run {show(leaves.get(k, before.get(k, _UNSET)))}, "
                 f"command line {show(changes[k])}" for k in refused]
        raise ValueError(
            f"resuming the run {run_dir} with overrides that change its config:\n" + "\n".join(lines)
            + f"\nResume with ckpt_path= alone (allowed: {', '.join(RESUME_HARMLESS)}), add resume_overrides=allow "
            "to change them anyway, or start a new run")
    resolved_file = run_dir / "config_resolved.yaml"
    resolved = _leaves(OmegaConf.to_container(OmegaConf.load(resolved_file))) if resolved_file.is_file() else {}
    for k, value in leaves.items():  # run_name etc. came from the run's own choices (model=..., data=...)
        if isinstance(value, str) and "${hydra:runtime.choices" in value and k in resolved:
            _set_leaf(recorded, k, resolved[k])
    for k, value in before.items():
        if k not in leaves and not any(k[:n] in leaves for n in range(1, len(k))):
            _set_leaf(recorded, k, value)
    for k, value in changes.items():
        _set_leaf(recorded, k, value)
    recorded.update(ckpt_path=cfg.ckpt_path, resume_overrides=policy)
    merged = OmegaConf.create(recorded)
    OmegaConf.set_struct(merged, True)
    return merged


def write_config_record(cfg: DictConfig, out_dir: Path) -> Optional[Path]:
    """``config_resolved.yaml`` next to this start's Hydra record: the run folder for a new run,
    ``resumes/<time>/`` for a resume (where ``config.yaml`` is replaced by the config that runs, the
    run's own); nothing in DDP worker processes (no Hydra record)."""
    subdir = HydraConfig.get().output_subdir
    if subdir is None:
        return None
    record = out_dir / subdir
    folder = out_dir if subdir == ".hydra" else record
    if recorded_run(cfg.get("ckpt_path")) is not None:
        record.mkdir(parents=True, exist_ok=True)
        (record / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    path = folder / "config_resolved.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def command_line_keys(cfg: Optional[DictConfig] = None) -> set:
    """Keys set by the command line of this Hydra run (``trainer.max_epochs=5`` → ``trainer.max_epochs``); for a
    resumed run (``cfg.ckpt_path`` in a run folder) also those of the run's first command."""
    if not HydraConfig.initialized():
        return set()
    overrides = list(HydraConfig.get().overrides.task)
    run_dir = recorded_run(cfg.get("ckpt_path")) if cfg is not None else None
    if run_dir is not None and (run_dir / ".hydra" / "overrides.yaml").is_file():
        overrides += OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def write_run_info(out_dir: Path, cfg: DictConfig, trainer: L.Trainer, config: Optional[Path] = None) -> Path:
    """``run_info.json`` (``run_info_resumed_<time>.json`` when resuming): environment, seed, trainer flags and
    ``config``, the resolved config this start ran with (relative to ``out_dir``)."""
    from pyg_equireann.utils import environment_info

    now = datetime.datetime.now()
    resumed = cfg.get("ckpt_path") not in (None, "", "None", "null")
    info = {"time": now.isoformat(timespec="seconds"), "seed": cfg.get("seed"), "float64": cfg.get("float64"),
            "resumed_from": str(cfg.ckpt_path) if resumed else None,
            "config": str(config.relative_to(out_dir)) if config is not None else "config_resolved.yaml",
            "trainer": {"deterministic": cfg.trainer.get("deterministic"), "precision": str(trainer.precision),
                        "accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size},
            **environment_info()}
    path = out_dir / (f"run_info_resumed_{now:%Y%m%d-%H%M%S}.json" if resumed else "run_info.json")
    path.write_text(json.dumps(info, indent=2))
    return path


@dataclass
class TrainResult:
    """What :func:`train` leaves: the trainer and module after ``fit`` (and ``test``), ``train_summary.json``'s
    content, the test metrics (empty without ``cfg.test``) and the learning curve's file (``None``: no curve)."""

    trainer: L.Trainer
    module: L.LightningModule
    summary: Dict[str, Any]
    results: Dict[str, float]
    curve: Optional[Path]


def train(cfg: DictConfig, out_dir: Path, config_record: Optional[Path] = None, datamodule=None) -> TrainResult:
    """Train (and test) the run ``cfg`` in ``out_dir``: data, module (:func:`~pyg_equireann.training.prepare.
    build_module`), trainer (:func:`~pyg_equireann.training.prepare.build_trainer`), ``trainer.fit`` (resuming
    from ``cfg.ckpt_path``), then ``train_summary.json``, ``learning_curve.png`` and, with ``cfg.test``, the
    best checkpoint's ``test_metrics.json``. The one training path of ``equireann-train`` and of the
    equal-budget harness (:mod:`pyg_equireann.experiments.harness`), which may pass a ``datamodule`` of
    ``cfg.data`` that is already set up (shared by several runs)."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True)
    if datamodule is None:
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        log.info("%s", datamodule.summary())
    if cfg.get("ckpt_path"):  # a clear error for an unreadable checkpoint or one of another model
        check_model_config(cfg.ckpt_path, read_checkpoint(cfg.ckpt_path), prepare_model_config(cfg.model, datamodule))
    module = build_module(cfg.model, cfg.module, datamodule, cfg.float64, cfg.get("calibrate_densities", True))
    trainer, callbacks = build_trainer(cfg, out_dir)
    if trainer.is_global_zero:
        write_run_info(out_dir, cfg, trainer, config_record)
    params = sum(p.numel() for p in module.parameters())
    log.info("model %s: %s parameters; run folder %s", type(module.model).__name__, f"{params:,}", out_dir)
    fit_start, fit_cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
    summary = {"model": type(getattr(module.model, "model", module.model)).__name__, "parameters": params,
               "epochs": trainer.current_epoch, "steps": trainer.global_step,
               "fit_wall_seconds": time.perf_counter() - fit_start, "fit_cpu_seconds": time.process_time() - fit_cpu,
               "checkpoint": best or ""}
    stopped = next((c.reason for c in callbacks if isinstance(c, EpochLog)), None)
    if stopped:
        summary["stop_reason"] = stopped
    budget = training_budget(callbacks)
    if budget is not None:
        summary.update({"budget_minutes": None if budget.seconds is None else budget.seconds / 60,
                        "budget_epochs": budget.epochs, "budget_clock": budget.clock,
                        "training_minutes": budget.elapsed / 60})
    if trainer.is_global_zero:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))

    curve = learning_curve(out_dir, out_dir / "learning_curve.png")
    results: Dict[str, float] = {}
    if cfg.get("test"):
        for entry in trainer.test(module, datamodule=datamodule, ckpt_path="best" if best else None, verbose=False,
                                  weights_only=True):
            results.update({k: float(v) for k, v in entry.items()})
        if trainer.is_global_zero:
            (out_dir / "test_metrics.json").write_text(json.dumps(results, indent=2))
    return TrainResult(trainer, module, summary, results, curve)
