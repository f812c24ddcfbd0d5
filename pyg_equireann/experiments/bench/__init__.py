"""Benchmark suite (``equireann-bench``): speed/memory and equal-budget accuracy of EquiREANN and
other GNN potentials, with Markdown/CSV/PNG reports.

:func:`run_bench` runs the modes of ``conf/bench.yaml``: :func:`speed_bench` (``speed.run_speed``, models
from ``conf/model`` through Hydra's compose API) and :func:`accuracy_bench` (``accuracy.run_accuracy``, the
equal-budget harness :mod:`pyg_equireann.experiments.harness`); the files are written by ``report``."""
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf


def _select(available: Dict[str, Any], names: List[str], what: str) -> Dict[str, Any]:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; available: {sorted(available)}")
    return {n: available[n] for n in names}


def speed_bench(cfg: DictConfig, out_dir: Path) -> str:
    """The speed table of ``cfg.models`` on ``cfg.speed.systems`` (``conf/bench.yaml``), written to ``out_dir``;
    returns its Markdown section."""
    import torch

    from pyg_equireann.experiments.bench.report import write_speed_report
    from pyg_equireann.experiments.bench.speed import run_speed
    from pyg_equireann.experiments.harness import model_configs
    from pyg_equireann.experiments.bench.systems import build_system

    speed = cfg.speed
    torch.set_num_threads(int(speed.threads))
    overrides = OmegaConf.to_container(speed.model_overrides) if speed.get("model_overrides") else {}
    configs = model_configs(list(cfg.models), overrides)
    systems = {name: build_system(name) for name in speed.systems}
    rows = run_speed(configs, systems, list(speed.dtypes), int(speed.repeats), int(speed.warmup),
                     float(speed.max_seconds), bool(speed.memory), str(speed.device), str(cfg.reference))
    return write_speed_report(rows, out_dir, str(cfg.reference), int(speed.repeats), int(speed.warmup),
                              list(speed.dtypes)[0])


def accuracy_bench(cfg: DictConfig, out_dir: Path) -> str:
    """Equal-budget training of ``cfg.models`` on ``cfg.datasets`` into ``out_dir/accuracy``, reports written
    to ``out_dir``; returns the Markdown section."""
    from pyg_equireann.experiments.bench.accuracy import run_accuracy
    from pyg_equireann.experiments.bench.report import write_accuracy_report

    acc, budget = cfg.accuracy, cfg.budget
    models = _select(OmegaConf.to_container(acc.model_overrides), list(cfg.models), "model")
    datasets = _select(OmegaConf.to_container(acc.dataset_overrides), list(cfg.datasets), "dataset")
    common = list(acc.common) + [f"budget.minutes={budget.minutes}", f"budget.clock={budget.clock}",
                                 f"budget.snapshots={list(budget.snapshots)}"]
    if budget.get("epochs"):
        common.append(f"trainer.max_epochs={budget.epochs}")
    result = run_accuracy(models, datasets, common, out_dir / "accuracy", int(acc.jobs), int(acc.threads),
                          acc.get("curve_frames"))
    return write_accuracy_report(result, out_dir, OmegaConf.to_container(budget), list(acc.common), int(acc.jobs),
                                 int(acc.threads), acc.get("curve_frames"))


def run_bench(cfg: DictConfig, out_dir: Path) -> Path:
    """``cfg.mode`` (speed, accuracy or both) into ``out_dir``; returns ``report.md`` (all sections)."""
    if cfg.mode not in ("speed", "accuracy", "both"):
        raise ValueError(f"mode must be speed, accuracy or both, got {cfg.mode!r}")
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    parts = []
    if cfg.mode in ("speed", "both"):
        parts.append(speed_bench(cfg, out_dir))
    if cfg.mode in ("accuracy", "both"):
        parts.append(accuracy_bench(cfg, out_dir))
    report = out_dir / "report.md"
    report.write_text("# equireann-bench report\n\n" + "\n\n".join(parts))
    return report
