"""Speed and memory of energy+forces, every model in one process, interleaved."""
import logging
import multiprocessing
import resource
import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def build_bench_model(config: Mapping[str, Any], elements: Sequence[int], avg_num_neighbors: float,
                      seed: int = 0) -> nn.Module:
    """A model from its config with ``auto`` entries filled in (untrained weights, seeded)."""
    from pyg_equireann.training.module import build_model
    from pyg_equireann.training.prepare import fill_auto

    torch.manual_seed(seed)
    return build_model(fill_auto(config, elements, avg_num_neighbors))


def energy_and_forces(model: nn.Module, system: Mapping[str, Tensor]):
    """One energy+forces evaluation, neighbour list included: energies (B,), forces (N, 3)."""
    pos = system["pos"].detach().requires_grad_(True)
    energy = model(system["z"], pos, system["batch"], system.get("cell"), system.get("pbc"))
    forces = -torch.autograd.grad(energy.sum(), pos)[0]
    return energy.detach(), forces


def _cast(system: Mapping[str, Any], dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    out = {}
    for key, value in system.items():
        if isinstance(value, Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_models(models: Dict[str, nn.Module], system: Mapping[str, Any], repeats: int = 20, warmup: int = 3,
                max_seconds: float = 60.0, device: str = "cpu") -> Dict[str, Dict[str, Any]]:
    """Median and minimum time of energy+forces per model on one system, models interleaved (A B C, C B A, …)
    after ``warmup`` calls each. A model whose warm call alone takes more than ``max_seconds`` is not
    timed (status ``skipped``); slow models get fewer repeats (at least 3) so each model costs about
    ``max_seconds``. Models that cannot run the system (e.g. no periodic cells) get status ``n/a``."""
    device = torch.device(device)
    results: Dict[str, Dict[str, Any]] = {}
    active: Dict[str, nn.Module] = {}
    for name, model in models.items():
        try:
            start, calls = time.perf_counter(), 0
            for _ in range(max(warmup, 1)):
                energy_and_forces(model, system)
                _sync(device)
                calls += 1
                if time.perf_counter() - start > max_seconds:
                    break
            per_call = (time.perf_counter() - start) / calls
        except ValueError as error:  # e.g. "does not support periodic cells"
            results[name] = {"status": "n/a", "note": str(error)}
            continue
        if per_call > max_seconds:
            results[name] = {"status": "skipped", "note": f"one call took {per_call:.0f} s > max_seconds"}
            continue
        results[name] = {"status": "ok", "samples": [], "repeats": int(min(repeats, max(3, max_seconds // per_call)))}
        active[name] = model
    rounds = max((r["repeats"] for r in results.values() if r["status"] == "ok"), default=0)
    for round_ in range(rounds):
        order = list(active.items())
        if round_ % 2:
            order.reverse()
        for name, model in order:
            if len(results[name]["samples"]) >= results[name]["repeats"]:
                continue
            start = time.perf_counter()
            energy_and_forces(model, system)
            _sync(device)
            results[name]["samples"].append(time.perf_counter() - start)
    for result in results.values():
        if result["status"] == "ok":
            result["median_s"] = statistics.median(result["samples"])
            result["min_s"] = min(result["samples"])
    return results


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs``; ignored elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss(fallback: int) -> int:
    """Peak resident set size in bytes (``VmHWM``; ``ru_maxrss`` is useless here: it survives exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(fallback, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _peak_memory_worker(config, elements, avg_num_neighbors, system, dtype, device, queue):
    try:
        import psutil

        torch.set_num_threads(1)
        model = build_bench_model(config, elements, avg_num_neighbors).to(device, dtype)
        system = _cast(system, dtype, torch.device(device))
        before = psutil.Process().memory_info().rss  # model and inputs built, nothing evaluated yet
        energy_and_forces(model, system)  # lazy initialisation done
        _reset_peak_rss()
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        energy_and_forces(model, system)
        peak = _peak_rss(before)
        gpu = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
        queue.put({"rss_mb": peak / 2**20, "rss_increase_mb": max(peak - before, 0) / 2**20,
                   "gpu_max_allocated_mb": None if gpu is None else gpu / 2**20})
    except Exception as error:  # reported in the table, not raised in the child
        queue.put({"error": f"{type(error).__name__}: {error}"})


def peak_memory(config: Mapping[str, Any], elements: Sequence[int], avg_num_neighbors: float,
                system: Mapping[str, Any], dtype: torch.dtype, device: str = "cpu",
                timeout: float = 600.0) -> Dict[str, Optional[float]]:
    """Peak resident memory of a fresh process that builds the model and runs energy+forces twice
    (``rss_mb``: peak of the whole process during the second call, incl. torch itself;
    ``rss_increase_mb``: that peak minus the resident size before the first call, i.e. what evaluating
    the system costs) and, on GPU, ``torch.cuda.max_memory_allocated``. Each measurement runs in its own
    spawned process, because a process's peak RSS never goes down."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    system = {k: v for k, v in system.items()}
    proc = ctx.Process(target=_peak_memory_worker,
                       args=(dict(config), list(elements), avg_num_neighbors, system, dtype, device, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"error": f"no result within {timeout:.0f} s"}
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
    return result


def run_speed(model_configs: Dict[str, Mapping[str, Any]], systems: Dict[str, Mapping[str, Any]],
              dtypes: Sequence[str] = ("float32",), repeats: int = 20, warmup: int = 3, max_seconds: float = 60.0,
              memory: bool = True, device: str = "cpu", reference: str = "equireann", elements=(1, 6, 8),
              avg_num_neighbors: float = 12.0, progress: bool = True) -> List[Dict[str, Any]]:
    """The speed table: one row per (system, dtype, model) with ms per structure, µs per atom, ratio to
    ``reference``, parameter count and peak memory."""
    from tqdm.auto import tqdm

    rows: List[Dict[str, Any]] = []
    cases = [(s, d) for s in systems for d in dtypes]
    for system_name, dtype_name in tqdm(cases, desc="speed", disable=not progress):
        dtype = getattr(torch, dtype_name)
        system = _cast(systems[system_name], dtype, torch.device(device))
        num_graphs = int(system["num_graphs"])
        num_atoms = int(system["z"].numel())
        models = {name: build_bench_model(cfg, elements, avg_num_neighbors).to(device, dtype)
                  for name, cfg in model_configs.items()}
        timings = time_models(models, system, repeats, warmup, max_seconds, device)
        ref = timings.get(reference, {}).get("median_s")
        for name, result in timings.items():
            row = {"system": system_name, "atoms": num_atoms, "structures": num_graphs, "dtype": dtype_name,
                   "model": name, "parameters": sum(p.numel() for p in models[name].parameters()),
                   "status": result["status"], "note": result.get("note", "")}
            if result["status"] == "ok":
                row.update({
                    "ms_per_structure": 1e3 * result["median_s"] / num_graphs,
                    "ms_per_structure_min": 1e3 * result["min_s"] / num_graphs,
                    "us_per_atom": 1e6 * result["median_s"] / num_atoms,
                    "repeats": len(result["samples"]),
                    "ratio_to_reference": result["median_s"] / ref if ref else None,
                })
                if memory:
                    row.update(peak_memory(model_configs[name], elements, avg_num_neighbors, systems[system_name],
                                           dtype, device))
            rows.append(row)
        del models
    return rows
