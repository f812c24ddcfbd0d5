"""Equal-budget training of several models on several datasets, each run an ``equireann-train``
subprocess (same data module, split, loss, optimiser and budget), then learning curves from the
budget snapshots evaluated on the test set."""
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

log = logging.getLogger(__name__)


def train_command(model_overrides: Sequence[str], dataset_overrides: Sequence[str], common: Sequence[str],
                  run_dir: Path) -> List[str]:
    """The ``equireann-train`` command line of one run (later overrides win)."""
    return [sys.executable, "-m", "pyg_equireann.cli.train", *common, *dataset_overrides, *model_overrides,
            f"hydra.run.dir={run_dir}"]


def _run(cmd: List[str], run_dir: Path, threads: int) -> Dict[str, Any]:
    """Train (unless the run folder already holds a finished run: a bench can be re-run to finish or
    to rebuild its report) and collect the run's summary and test metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"returncode": 0, "run_dir": str(run_dir)}
    if not (run_dir / "test_metrics.json").exists():
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        start = time.perf_counter()
        with open(run_dir / "stdout.log", "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        result.update(returncode=proc.returncode, wall_seconds=time.perf_counter() - start)
    for name in ("train_summary.json", "test_metrics.json"):
        path = run_dir / name
        if path.exists():
            result.update(json.loads(path.read_text()))
    if result["returncode"] != 0:
        tail = (run_dir / "stdout.log").read_text().strip().splitlines()[-5:]
        result["error"] = " | ".join(tail)
    return result


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


def run_accuracy(models: Mapping[str, Sequence[str]], datasets: Mapping[str, Sequence[str]],
                 common: Sequence[str], out_dir: Path, jobs: int = 1, threads: int = 1,
                 curve_frames: Optional[int] = 200, progress: bool = True) -> Dict[str, Any]:
    """Train every (dataset, model) pair with the same ``common`` overrides (budget, loss, optimiser),
    ``jobs`` runs at a time with ``threads`` threads each; returns ``{"runs": [...], "curves": {...}}``."""
    from tqdm.auto import tqdm

    cases = [(d, m) for d in datasets for m in models]
    commands = {(d, m): train_command(models[m], datasets[d], common, out_dir / d / m) for d, m in cases}
    for (d, m), cmd in commands.items():
        log.info("%s / %s: %s", d, m, " ".join(cmd[2:]))
    runs: List[Dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_run, commands[c], out_dir / c[0] / c[1], threads): c for c in cases}
        for future in tqdm(futures, desc="training", disable=not progress):
            dataset, model = futures[future]
            result = future.result()
            result.update({"dataset": dataset, "model": model})
            if result.get("error"):
                log.warning("%s / %s failed: %s", dataset, model, result["error"])
            runs.append(result)
    curves: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for dataset, model in tqdm(cases, desc="learning curves", disable=not progress):
        run_dir = out_dir / dataset / model
        if (run_dir / "snapshots").exists():
            curves.setdefault(dataset, {})[model] = evaluate_snapshots(run_dir, curve_frames, threads)
    (out_dir / "curves.json").write_text(json.dumps(curves, indent=2))
    return {"runs": runs, "curves": curves}
