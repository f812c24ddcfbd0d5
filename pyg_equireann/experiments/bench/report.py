"""Markdown, CSV and PNG reports of the speed and accuracy benchmarks."""
import csv
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in keys})
    return path


def speed_markdown(rows: Sequence[Mapping[str, Any]], reference: str = "equireann") -> str:
    """One table per (system, dtype): time per structure and per atom, ratio to the reference model,
    parameters and peak memory (resident memory in a fresh process; on CUDA also the GPU memory of a call).
    Models that did not run say why (``n/a``, ``skipped``, ``OOM``)."""
    out = []
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["dtype"]), []).append(row)
    for (system, dtype), group in groups.items():
        atoms, structures = group[0]["atoms"], group[0]["structures"]
        rss = any(row.get("rss_mb") is not None for row in group)
        gpu = any(row.get("peak_mb") is not None for row in group)
        columns = [("peak RSS (MB)", "rss_mb"), ("peak RSS increase (MB)", "rss_increase_mb")] if rss else []
        columns += [("peak GPU memory of a call (MB)", "peak_mb")] if gpu else []
        out.append(f"**{system}** ({structures} structure{'s' if structures > 1 else ''}, {atoms:,} atoms), {dtype}, "
                   "energy + forces incl. neighbour list")
        out.append("")
        out.append(f"| model | parameters | ms / structure | µs / atom | time ÷ {reference} |"
                   + "".join(f" {title} |" for title, _ in columns))
        out.append("|---|---|---|---|---|" + "---|" * len(columns))
        for row in group:
            if row["status"] != "ok":
                out.append(f"| {row['model']} | {_fmt(row['parameters'])} | {row['status']}: {row.get('note', '')} "
                           "| | |" + " |" * len(columns))
                continue
            ratio = row.get("ratio_to_reference")
            out.append(f"| {row['model']} | {_fmt(row['parameters'])} | {_fmt(row['ms_per_structure'])} | "
                       f"{_fmt(row['us_per_atom'])} | {'–' if ratio is None else f'{ratio:.2f}'} |"
                       + "".join(f" {_fmt(row.get(key))} |" for _, key in columns))
        out.append("")
    return "\n".join(out)


def train_step_markdown(rows: Sequence[Mapping[str, Any]], reference: str = "equireann") -> str:
    """One table per batch size: ms per training step (median and minimum), structures per second, step time
    ÷ the reference model's, parameters and peak memory of a step (CUDA; ``n/a`` on CPU), then the ratios of
    the medians and of the minima (less sensitive to other load on the machine) in one line."""
    out = []
    groups: Dict[int, List[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["batch_size"], []).append(row)
    for batch_size, group in groups.items():
        atoms = group[0]["atoms_per_step"]
        out += [f"**batch {batch_size}** ({atoms:,.0f} atoms per step), energy + force loss, double backward, "
                "optimiser step", "",
                f"| model | parameters | ms / step | ms / step (min) | structures / s | time ÷ {reference} | "
                "peak memory of a step (MB) |", "|---|---|---|---|---|---|---|"]
        ratios = []
        for row in group:
            if row["status"] != "ok":
                out.append(f"| {row['model']} | {_fmt(row['parameters'])} | {row['status']}: {row.get('note', '')} "
                           "| | | | |")
                continue
            ratio = row.get("ratio_to_reference")
            memory = "n/a" if row.get("peak_mb") is None else _fmt(row["peak_mb"])
            out.append(f"| {row['model']} | {_fmt(row['parameters'])} | {_fmt(row['ms_per_step'])} | "
                       f"{_fmt(row['ms_per_step_min'])} | {_fmt(row['structures_per_s'])} | "
                       f"{'–' if ratio is None else f'{ratio:.2f}'} | {memory} |")
            if ratio is not None and row["model"] != reference:
                ratios.append(f"{row['model']} / {reference} = {ratio:.2f} "
                              f"(minima: {row['ratio_to_reference_min']:.2f})")
        out.append("")
        if ratios:
            out += [f"Step time at batch {batch_size}: " + "; ".join(ratios) + ".", ""]
    return "\n".join(out)


def _save_loglog(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Log-log axes, labels, grid and legend; save to ``path`` and close the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speed_plot(rows: Sequence[Mapping[str, Any]], path: Path, dtype: str = "float32") -> Optional[Path]:
    """Log-log plot of time per structure against atoms per structure, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[str, List[tuple]] = {}
    for row in rows:
        if row["dtype"] == dtype and row["status"] == "ok":
            series.setdefault(row["model"], []).append((row["atoms"] / row["structures"], row["ms_per_structure"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model, points in series.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=model)
    return _save_loglog(fig, ax, path, f"speed ({dtype})", "atoms per structure", "energy + forces: ms per structure")


ACCURACY_COLUMNS = ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse")


def accuracy_rows(runs: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Flatten run results: one row per (dataset, model, test set)."""
    rows = []
    for run in runs:
        base = {"dataset": run["dataset"], "model": run["model"], "parameters": run.get("parameters"),
                "epochs": run.get("epochs"), "steps": run.get("steps"),
                "training_minutes": run.get("training_minutes"), "budget_clock": run.get("budget_clock"),
                "train_forces_mae": run.get("last_epoch/train/forces_mae"), "error": run.get("error", "")}
        test_sets = sorted({k.split("/")[1] if k.count("/") == 2 else "test" for k in run if k.startswith("test/")})
        if not test_sets:
            rows.append({**base, "test_set": "–"})
        for name in test_sets:
            prefix = "test/" if name == "test" else f"test/{name}/"
            rows.append({**base, "test_set": name, **{c: run.get(prefix + c) for c in ACCURACY_COLUMNS}})
    return rows


def accuracy_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per row; "train F" is the force MAE on the training batches of the last epoch (live weights):
    far below the test F MAE, the run is limited by how it generalises rather than by optimiser steps."""
    out = ["| dataset | test set | model | parameters | epochs | steps | training min | E MAE (meV) | E RMSE (meV) | "
           "F MAE (meV/Å) | F RMSE (meV/Å) | train F, last epoch (meV/Å) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("error"):
            out.append(f"| {row['dataset']} | – | {row['model']} | failed: {row['error'][:120]} | | | | | | | | |")
            continue
        out.append(f"| {row['dataset']} | {row['test_set']} | {row['model']} | {_fmt(row['parameters'])} | "
                   f"{_fmt(row['epochs'])} | {_fmt(row.get('steps'))} | {_fmt(row['training_minutes'])} | " +
                   " | ".join(_fmt(row.get(c)) for c in ACCURACY_COLUMNS) +
                   f" | {_fmt(row.get('train_forces_mae'))} |")
    return "\n".join(out)


def learning_curve_plot(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str,
                        metric: str = "forces_mae") -> Optional[Path]:
    """Test metric against training time, all models of one dataset on one plot (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = False
    for model, points in curves.items():
        points = [p for p in points if metric in p]
        if points:
            ax.plot([p["minutes"] for p in points], [p[metric] for p in points], marker="o", label=model)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ylabel = {"forces_mae": "test force MAE (meV/Å)", "energy_mae": "test energy MAE (meV)"}.get(metric, metric)
    return _save_loglog(fig, ax, path, title, "training time (min)", ylabel)


def step_curve_plot(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str,
                    metric: str = "forces_mae") -> Optional[Path]:
    """Validation metric against optimiser steps (learning per step), all models of one dataset (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = False
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, (model, points) in enumerate(curves.items()):
        points = [p for p in points if metric in p and p["step"] > 0]
        if points:
            ax.plot([p["step"] for p in points], [p[metric] for p in points], label=model, color=colors(i))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ylabel = {"forces_mae": "validation force MAE (meV/Å)", "energy_mae": "validation energy MAE (meV)"}.get(
        metric, metric)
    return _save_loglog(fig, ax, path, title, "optimiser steps", ylabel)


def machine() -> str:
    """CPU model, logical CPUs, memory, Python and torch versions and torch threads, in one line."""
    import psutil
    import torch

    cpu, threads = platform.processor() or platform.machine(), torch.get_num_threads()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {threads} thread{'s' if threads != 1 else ''}")


def write_speed_report(rows: Sequence[Mapping[str, Any]], out_dir: Path, reference: str, repeats: int,
                       warmup: int, dtype: str) -> str:
    """``speed.csv``, ``speed.png`` (``dtype`` rows) and ``speed.md`` in ``out_dir``; returns the Markdown."""
    write_csv(rows, out_dir / "speed.csv")
    plot = speed_plot(rows, out_dir / "speed.png", dtype)
    memory = []
    if any(row.get("rss_mb") is not None for row in rows):
        memory.append("peak resident memory in a fresh process per model and system")
    if any(row.get("peak_mb") is not None for row in rows):
        memory.append("peak GPU memory of a call: `torch.cuda.max_memory_allocated` during a timed call "
                      "minus the memory allocated before it")
    text = (f"## Speed\n\nMachine: {machine()}.\nMedian of up to {repeats} interleaved repeats after "
            f"{warmup} warm-up calls; {'; '.join(memory) or 'memory not measured (speed.memory=false)'}.\n\n"
            f"{speed_markdown(rows, reference)}")
    if plot:
        text += f"\n![time per structure]({plot.name})\n"
    (out_dir / "speed.md").write_text(text)
    return text


def write_train_step_report(rows: Sequence[Mapping[str, Any]], out_dir: Path, reference: str, repeats: int,
                            warmup: int, dataset: str) -> str:
    """``train_step.csv`` and ``train_step.md`` in ``out_dir``; returns the Markdown."""
    write_csv(rows, out_dir / "train_step.csv")
    device = rows[0]["device"] if rows else "cpu"
    memory = ("peak memory: `torch.cuda.max_memory_allocated` during a timed step minus the memory allocated "
              "before it (activations, gradients, temporaries; not weights, optimiser state or batches)"
              if device == "cuda" else
              "peak memory: n/a on CPU (torch has no CPU counterpart of `max_memory_allocated`, and the resident "
              "size of a process that already took steps does not show what one step needs; `bench=speed` "
              "measures energy+forces in a fresh process)")
    text = (f"## Training step\n\nMachine: {machine()}, device {device}.\n{dataset}, batches as the training "
            "data module yields them (cached neighbour list); one step = `PotentialModule.predict_batch(batch, "
            "create_graph=True)` + its loss + `loss.backward()` + the module's optimiser step + `zero_grad`. "
            f"Median of up to {repeats} interleaved steps per model after {warmup} warm-up steps; {memory}.\n\n"
            f"{train_step_markdown(rows, reference)}")
    (out_dir / "train_step.md").write_text(text)
    return text


def write_accuracy_report(result: Mapping[str, Any], out_dir: Path, budget: Mapping[str, Any],
                          common: Sequence[str], jobs: int, threads: int, curve_frames: Optional[int]) -> str:
    """``accuracy.csv``, ``accuracy.json``, ``learning_curves_<dataset>.png`` and ``accuracy.md`` in ``out_dir``
    from :func:`~pyg_equireann.experiments.bench.accuracy.run_accuracy`'s ``result``; ``budget``: minutes,
    clock, epochs; ``common``: the shared overrides. Returns the Markdown."""
    rows = accuracy_rows(result["runs"])
    write_csv(rows, out_dir / "accuracy.csv")
    (out_dir / "accuracy.json").write_text(json.dumps(result, indent=2, default=str))
    if budget.get("minutes") is None:
        limit = f"{budget.get('epochs')} epochs per model (equal optimiser steps)"
    else:
        limit = (f"{budget['minutes']} min of {'CPU' if budget['clock'] == 'process' else 'wall-clock'} time inside "
                 "training steps per model" + (f", at most {budget['epochs']} epochs" if budget.get("epochs") else ""))
    text = (f"## Accuracy at equal budget\n\nMachine: {machine()}.\nBudget: {limit} "
            f"({threads} thread(s) per run, {jobs} run(s) at a time)"
            + f". Shared settings: `{' '.join(common)}`.\n\n{accuracy_markdown(rows)}\n")
    for dataset, curves in result["curves"].items():
        plot = learning_curve_plot(curves, out_dir / f"learning_curves_{dataset}.png",
                                   f"{dataset}: test force MAE ({curve_frames} frames) vs training time")
        if plot:
            text += f"\n![{dataset} learning curves]({plot.name})\n"
    for dataset, curves in result.get("step_curves", {}).items():
        plot = step_curve_plot(curves, out_dir / f"learning_per_step_{dataset}.png",
                               f"{dataset}: validation force MAE vs optimiser steps")
        if plot:
            text += f"\n![{dataset} learning per step]({plot.name})\n"
    (out_dir / "accuracy.md").write_text(text)
    return text
