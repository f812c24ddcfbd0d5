"""Benchmark suite (``equireann-bench``): speed/memory, training-step speed and equal-budget accuracy of
EquiREANN and other GNN potentials, with Markdown/CSV/PNG reports.

:func:`run_bench` runs the modes of ``conf/bench.yaml``: :func:`speed_bench` (``speed.run_speed``, models
from ``conf/model`` through Hydra's compose API), :func:`train_step_bench` (``train_step.run_train_step``) and
:func:`accuracy_bench` (``accuracy.run_accuracy``, the equal-budget harness
:mod:`pyg_equireann.experiments.harness`); the files are written by ``report``."""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf


def _select(available: Dict[str, Any], names: List[str], what: str) -> Dict[str, Any]:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; available: {sorted(available)}")
    return {n: available[n] for n in names}


def bench_model_configs(cfg: DictConfig, overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
                        ) -> Dict[str, Dict[str, Any]]:
    """The model configs of ``cfg.models``: ``conf/model/<name>.yaml``, or for a name in ``cfg.variants``
    (``{model: <conf/model name>, <key>: <value>, ...}``, e.g. ``{model: equireann, compile: true}``) that
    config with the variant's keys; then ``overrides[name]`` (a dict of model keys) merged in."""
    from pyg_equireann.experiments.harness import model_configs

    variants = OmegaConf.to_container(cfg.variants) if cfg.get("variants") else {}
    overrides = dict(overrides or {})
    configs = {}
    for name in cfg.models:
        variant = dict(variants.get(name, {"model": name}))
        base = variant.pop("model")
        configs[name] = model_configs([base], {base: {**variant, **overrides.get(name, {})}})[base]
    return configs


def speed_bench(cfg: DictConfig, out_dir: Path) -> str:
    """The speed table of ``cfg.models`` on ``cfg.speed.systems`` (``conf/bench.yaml``), written to ``out_dir``;
    returns its Markdown section."""
    import torch

    from pyg_equireann.experiments.bench.report import write_speed_report
    from pyg_equireann.experiments.bench.speed import run_speed
    from pyg_equireann.experiments.bench.systems import build_system

    speed = cfg.speed
    torch.set_num_threads(int(speed.threads))
    overrides = OmegaConf.to_container(speed.model_overrides) if speed.get("model_overrides") else {}
    configs = bench_model_configs(cfg, overrides)
    systems = {name: build_system(name) for name in speed.systems}
    rows = run_speed(configs, systems, list(speed.dtypes), int(speed.repeats), int(speed.warmup),
                     float(speed.max_seconds), bool(speed.memory), str(speed.device), str(cfg.reference))
    return write_speed_report(rows, out_dir, str(cfg.reference), int(speed.repeats), int(speed.warmup),
                              list(speed.dtypes)[0])


def train_step_bench(cfg: DictConfig, out_dir: Path) -> str:
    """The training-step table of ``cfg.models`` (``cfg.train_step``: data set, batch sizes, threads, device),
    written to ``out_dir``; returns its Markdown section."""
    import torch

    from pyg_equireann.experiments.bench.report import write_train_step_report
    from pyg_equireann.experiments.bench.train_step import run_train_step

    step = cfg.train_step
    torch.set_num_threads(int(step.threads))
    overrides = OmegaConf.to_container(step.model_overrides) if step.get("model_overrides") else {}
    module = OmegaConf.to_container(step.module_overrides) if step.get("module_overrides") else {}
    data = _select(OmegaConf.to_container(cfg.accuracy.dataset_overrides), [step.dataset], "dataset")[step.dataset]
    rows = run_train_step(bench_model_configs(cfg, overrides), [*data, *step.data_overrides],
                          list(step.batch_sizes), int(step.repeats), int(step.warmup), float(step.max_seconds),
                          str(step.device), bool(step.float64), str(cfg.reference), module)
    dtype = "float64" if step.float64 else "float32"
    return write_train_step_report(rows, out_dir, str(cfg.reference), int(step.repeats), int(step.warmup),
                                   f"{step.dataset} training data" + "".join(f", {o}" for o in step.data_overrides)
                                   + f", {dtype}")


def accuracy_bench(cfg: DictConfig, out_dir: Path) -> str:
    """Equal-budget training of ``cfg.models`` on ``cfg.datasets`` into ``out_dir/accuracy``, reports written
    to ``out_dir``; returns the Markdown section."""
    from pyg_equireann.experiments.bench.accuracy import run_accuracy
    from pyg_equireann.experiments.bench.report import write_accuracy_report

    acc, budget = cfg.accuracy, cfg.budget
    models = _select(OmegaConf.to_container(acc.model_overrides), list(cfg.models), "model")
    datasets = _select(OmegaConf.to_container(acc.dataset_overrides), list(cfg.datasets), "dataset")
    minutes = "null" if budget.minutes is None else budget.minutes
    common = list(acc.common) + [f"budget.minutes={minutes}", f"budget.clock={budget.clock}",
                                 f"budget.snapshots={list(budget.snapshots)}"]
    if budget.get("epochs"):
        common.append(f"trainer.max_epochs={budget.epochs}")
    result = run_accuracy(models, datasets, common, out_dir / "accuracy", int(acc.jobs), int(acc.threads),
                          acc.get("curve_frames"))
    return write_accuracy_report(result, out_dir, OmegaConf.to_container(budget), list(acc.common), int(acc.jobs),
                                 int(acc.threads), acc.get("curve_frames"))


MODES = ("speed", "train_step", "accuracy")


def run_bench(cfg: DictConfig, out_dir: Path) -> Path:
    """The modes ``cfg.mode`` (``speed``, ``train_step``, ``accuracy``, ``both`` = speed and accuracy, or a list
    of them) into ``out_dir``; returns ``report.md`` (all sections)."""
    modes = ["speed", "accuracy"] if cfg.mode == "both" else [cfg.mode] if isinstance(cfg.mode, str) else list(cfg.mode)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, both, or a list of them; got {cfg.mode!r}")
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    benches = {"speed": speed_bench, "train_step": train_step_bench, "accuracy": accuracy_bench}
    parts = [benches[mode](cfg, out_dir) for mode in MODES if mode in modes]
    report = out_dir / "report.md"
    report.write_text("# equireann-bench report\n\n" + "\n\n".join(parts))
    return report
