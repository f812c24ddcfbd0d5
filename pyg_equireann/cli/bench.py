"""``equireann-bench``: compare EquiREANN with other GNN potentials (Hydra app, ``conf/bench.yaml``).

  equireann-bench                                   # speed: aspirin ×32 and water boxes, all models
  equireann-bench bench=accuracy                    # equal-budget training on rMD17 aspirin, ethanol, …
  equireann-bench bench=quick                       # both, small, under 10 minutes
  equireann-bench bench=accuracy budget.minutes=60 datasets=[aspirin] models=[equireann,mace]

Outputs in the run folder (``bench_runs/<mode>/<time>/``): ``speed.md``, ``speed.csv``, ``speed.png``,
``accuracy.md``, ``accuracy.csv``, ``learning_curves_<dataset>.png``, ``report.md`` (all tables) and
the training run folders (``accuracy/<dataset>/<model>/``). Running again with
``hydra.run.dir=<that folder>`` finishes an interrupted accuracy bench (finished runs are not retrained)
or rebuilds its report.
"""
import json
import logging
import platform
from pathlib import Path
from typing import Any, Dict, List

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import CONF_DIR, hydra_entry, user_errors

log = logging.getLogger("equireann-bench")


def _machine() -> str:
    import os

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def _select(available: Dict[str, Any], names: List[str], what: str) -> Dict[str, Any]:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; available: {sorted(available)}")
    return {n: available[n] for n in names}


def _load_group_config(path: Path) -> DictConfig:
    """A config-group file with its defaults list (other files of the same group) merged in, as
    Hydra composes it (``_self_`` last unless listed)."""
    cfg = OmegaConf.load(path)
    defaults = list(cfg.pop("defaults", []))
    if not defaults:
        return cfg
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        merged = OmegaConf.merge(merged, cfg if entry == "_self_" else _load_group_config(path.parent / f"{entry}.yaml"))
    return merged


def model_configs(names: List[str], overrides: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Model configs from ``conf/model/<name>.yaml`` with per-model overrides."""
    configs = {}
    for name in names:
        path = Path(CONF_DIR) / "model" / f"{name}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ValueError(f"unknown model {name!r}: no {path}; available: {available}")
        cfg = _load_group_config(path)
        if name in (overrides or {}):
            cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides[name]))
        configs[name] = OmegaConf.to_container(cfg, resolve=True)
    return configs


def run_speed_mode(cfg: DictConfig, out_dir: Path) -> str:
    from pyg_equireann.experiments.bench.report import speed_markdown, speed_plot, write_csv
    from pyg_equireann.experiments.bench.speed import run_speed
    from pyg_equireann.experiments.bench.systems import build_system

    speed = cfg.speed
    torch.set_num_threads(int(speed.threads))
    configs = model_configs(list(cfg.models), OmegaConf.to_container(speed.model_overrides) if speed.get("model_overrides") else {})
    systems = {name: build_system(name) for name in speed.systems}
    rows = run_speed(configs, systems, list(speed.dtypes), int(speed.repeats), int(speed.warmup),
                     float(speed.max_seconds), bool(speed.memory), str(speed.device), str(cfg.reference))
    write_csv(rows, out_dir / "speed.csv")
    table = speed_markdown(rows, str(cfg.reference))
    plot = speed_plot(rows, out_dir / "speed.png", list(speed.dtypes)[0])
    text = (f"## Speed\n\nMachine: {_machine()}.\nMedian of up to {speed.repeats} interleaved repeats after "
            f"{speed.warmup} warm-up calls; peak memory in a fresh process per model and system.\n\n{table}")
    if plot:
        text += f"\n![time per structure]({plot.name})\n"
    (out_dir / "speed.md").write_text(text)
    return text


def run_accuracy_mode(cfg: DictConfig, out_dir: Path) -> str:
    from pyg_equireann.experiments.bench.accuracy import run_accuracy
    from pyg_equireann.experiments.bench.report import accuracy_markdown, accuracy_rows, learning_curve_plot, write_csv

    acc = cfg.accuracy
    models = _select(OmegaConf.to_container(acc.model_overrides), list(cfg.models), "model")
    datasets = _select(OmegaConf.to_container(acc.dataset_overrides), list(cfg.datasets), "dataset")
    budget = cfg.budget
    common = list(acc.common) + [f"budget.minutes={budget.minutes}", f"budget.clock={budget.clock}",
                                 f"budget.snapshots={list(budget.snapshots)}"]
    if budget.get("epochs"):
        common.append(f"trainer.max_epochs={budget.epochs}")
    result = run_accuracy(models, datasets, common, out_dir / "accuracy", int(acc.jobs), int(acc.threads),
                          acc.get("curve_frames"))
    rows = accuracy_rows(result["runs"])
    write_csv(rows, out_dir / "accuracy.csv")
    (out_dir / "accuracy.json").write_text(json.dumps(result, indent=2, default=str))
    text = (f"## Accuracy at equal budget\n\nMachine: {_machine()}.\nBudget: {budget.minutes} min of "
            f"{'CPU' if budget.clock == 'process' else 'wall-clock'} time inside training steps per model "
            f"({acc.threads} thread(s) per run, {acc.jobs} run(s) at a time)"
            + (f", at most {budget.epochs} epochs" if budget.get("epochs") else "")
            + f". Shared settings: `{' '.join(acc.common)}`.\n\n{accuracy_markdown(rows)}\n")
    for dataset, curves in result["curves"].items():
        plot = learning_curve_plot(curves, out_dir / f"learning_curves_{dataset}.png",
                                   f"{dataset}: test force MAE ({acc.curve_frames} frames) vs training time")
        if plot:
            text += f"\n![{dataset} learning curves]({plot.name})\n"
    (out_dir / "accuracy.md").write_text(text)
    return text


def run(cfg: DictConfig) -> Path:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.mode not in ("speed", "accuracy", "both"):
        raise ValueError(f"mode must be speed, accuracy or both, got {cfg.mode!r}")
    parts = []
    if cfg.mode in ("speed", "both"):
        parts.append(run_speed_mode(cfg, out_dir))
    if cfg.mode in ("accuracy", "both"):
        parts.append(run_accuracy_mode(cfg, out_dir))
    report = out_dir / "report.md"
    report.write_text("# equireann-bench report\n\n" + "\n\n".join(parts))
    print("\n\n".join(parts))
    print(f"\nreport: {report}")
    return report


@hydra_entry("bench")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
