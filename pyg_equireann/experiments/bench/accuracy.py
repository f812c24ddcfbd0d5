"""Equal-budget training of several models on several datasets by the harness
(:func:`pyg_equireann.experiments.harness.train_models`: every run composed from ``conf/train.yaml`` with
the same data module, split, loss, optimiser and budget, each in its own worker process), then learning
curves from the budget snapshots evaluated on the test set."""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

log = logging.getLogger(__name__)


def train_configs(models: Mapping[str, Sequence[str]], datasets: Mapping[str, Sequence[str]],
                  common: Sequence[str]) -> Dict[str, Any]:
    """``{"<dataset>/<model>": train config}``: ``conf/train.yaml`` composed with the ``common``, dataset
    and model overrides (later ones win), with its ``hydra`` node (the overrides count as command line)."""
    from pyg_equireann.experiments.harness import compose

    return {f"{d}/{m}": compose("train", [*common, *datasets[d], *models[m]], return_hydra_config=True)
            for d in datasets for m in models}


def evaluate_snapshots(run_dir: Path, max_frames: Optional[int] = 200, threads: int = 1) -> List[Dict[str, float]]:
    """Test metrics of every ``snapshots/t<min>.ckpt`` of a run, on the first ``max_frames`` frames of the
    first test set of the run's own data configuration (as ``equireann-eval``): points of a learning curve
    at equal training time."""
    import torch
    from omegaconf import OmegaConf

    from pyg_equireann.training.evaluation import eval_datamodule, evaluate_sets, load_checkpoint

    snapshots = sorted((run_dir / "snapshots").glob("t*min.ckpt"))
    if not snapshots:
        return []
    torch.set_num_threads(threads)
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    datamodule = eval_datamodule(cfg.data)
    name = datamodule.test_names[0]
    dataset = datamodule.test_datasets[name]
    loader = datamodule.test_dataloader()[0]
    if max_frames is not None and len(dataset) > max_frames:
        from torch.utils.data import Subset
        from torch_geometric.loader import DataLoader

        loader = DataLoader(Subset(dataset, range(max_frames)), batch_size=datamodule.eval_batch_size)
    points = []
    for path in snapshots:
        module = load_checkpoint(str(path), bool(cfg.get("float64")))
        _, metrics = evaluate_sets(module, {name: loader})
        minutes = float(path.stem[1:-3])
        points.append({"minutes": minutes, **{k[len(name) + 1:]: v for k, v in metrics.items()}})
    return points


def _log_rows(run_dir: Path) -> List[Dict[str, str]]:
    """The rows of a run's Lightning CSV log (``logs/metrics.csv``), ``[]`` without one."""
    import csv

    path = run_dir / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def validation_curve(run_dir: Path) -> List[Dict[str, float]]:
    """The validation metrics of every epoch of a run (its ``logs/metrics.csv``, EMA weights) against the
    optimiser step: ``[{"step", "epoch", "forces_mae", "energy_mae", ...}]``, the learning per step."""
    points = []
    for row in _log_rows(run_dir):
        values = {k[len("val/"):]: float(v) for k, v in row.items() if k.startswith("val/") and v not in ("", None)}
        if values and row.get("step"):
            points.append({"step": int(float(row["step"])), "epoch": int(float(row["epoch"])), **values})
    return points


def last_epoch_fit(run_dir: Path) -> Dict[str, float]:
    """How closely a run fitted its training data against how it did on new frames: the training-batch metrics
    of its last logged epoch (live weights, mean over that epoch's batches) and that epoch's validation metrics
    (EMA weights), from ``logs/metrics.csv``, as ``{"train/forces_mae", "train/energy_mae", "val/forces_mae",
    "val/energy_mae"}`` (those present; ``{}`` without a log). With the test metrics they show whether a run is
    limited by optimisation (training error near the test error) or by how it generalises (far below)."""
    last: Dict[str, float] = {}
    for row in _log_rows(run_dir):
        for key in ("train/forces_mae", "train/energy_mae", "val/forces_mae", "val/energy_mae"):
            if row.get(key) not in ("", None):
                last[key] = float(row[key])
    return last


def run_accuracy(models: Mapping[str, Sequence[str]], datasets: Mapping[str, Sequence[str]],
                 common: Sequence[str], out_dir: Path, jobs: int = 1, threads: int = 1,
                 curve_frames: Optional[int] = 200, progress: bool = True) -> Dict[str, Any]:
    """Train every (dataset, model) pair into ``out_dir/<dataset>/<model>`` with the same ``common``
    overrides (budget, loss, optimiser), ``jobs`` runs at a time with ``threads`` threads each; finished runs
    are read, not retrained. Returns ``{"runs": [...], "curves": {dataset: {model: [...]}}, "step_curves": ...}``:
    test metrics at the budget snapshots (``curves``) and validation metrics per epoch against the optimiser
    step (``step_curves``, :func:`validation_curve`)."""
    from tqdm.auto import tqdm

    from pyg_equireann.experiments.harness import train_models

    configs = train_configs(models, datasets, common)
    for name, cfg in configs.items():
        log.info("%s: %s", name, " ".join(cfg.hydra.overrides.task))
    results = train_models(configs, out_dir, jobs=max(1, jobs), threads=threads, resume=True, record_errors=True,
                           progress=progress)
    runs: List[Dict[str, Any]] = []
    for name, result in results.items():
        dataset, model = name.split("/")
        fit = {f"last_epoch/{k}": v for k, v in last_epoch_fit(out_dir / name).items()}
        runs.append({**result, **fit, "dataset": dataset, "model": model})
    curves: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    step_curves: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for name in tqdm(results, desc="learning curves", disable=not progress):
        dataset, model = name.split("/")
        if (out_dir / name / "snapshots").exists():
            curves.setdefault(dataset, {})[model] = evaluate_snapshots(out_dir / name, curve_frames, threads)
        step_curves.setdefault(dataset, {})[model] = validation_curve(out_dir / name)
    (out_dir / "curves.json").write_text(json.dumps(curves, indent=2))
    (out_dir / "step_curves.json").write_text(json.dumps(step_curves, indent=2))
    return {"runs": runs, "curves": curves, "step_curves": step_curves}
