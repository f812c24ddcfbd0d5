"""Speed and memory of energy+forces, every model in one process, interleaved by :func:`interleaved_timings`
(which also times the training step, :mod:`~pyg_equireann.experiments.bench.train_step`), out-of-memory safe."""
import functools
import gc
import logging
import multiprocessing
import resource
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

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
    """One energy+forces evaluation, neighbour list included: energies (B,), forces (N, 3). Models with a
    cached-graph interface (EquiREANN, REANN) go through :func:`~pyg_equireann.graph.forces.energy_forces_stress`,
    the path of training, evaluation and ``compile=true``."""
    if getattr(model, "caches_graph", False):
        from pyg_equireann.graph.forces import energy_forces_stress

        out = energy_forces_stress(model, system["z"], system["pos"], system["batch"], system.get("cell"),
                                   system.get("pbc"))
        return out["energy"].detach(), out["forces"]
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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA) or the RuntimeError of
    another allocator ("out of memory", the CPU allocator's "can't allocate memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    """Return what a failed call left behind (its tensors are freed once its traceback is gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def interleaved_timings(calls: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3,
                        max_seconds: float = 60.0, device: str = "cpu") -> Dict[str, Dict[str, Any]]:
    """Median and minimum wall time of each ``calls[name]()`` (one unit of work, e.g. an energy+forces call or
    a training step), calls interleaved (A B C, C B A, …) after ``warmup`` calls each. A call that takes
    more than ``max_seconds`` after the first (which may compile) is not timed (status ``skipped``); slow ones
    get fewer repeats (at least 3) so each costs about ``max_seconds``. A ValueError during warm-up (e.g.
    "does not support periodic cells") gives status ``n/a``; running out of memory at any time gives ``OOM``, frees
    what the call held and goes on with the others. On CUDA, ``peak_mb``: the most memory allocated during a
    timed call beyond what was allocated before it (``torch.cuda.max_memory_allocated``), the largest over the
    timed calls."""
    device = torch.device(device)
    results: Dict[str, Dict[str, Any]] = {}
    active: Dict[str, Callable[[], Any]] = {}

    def out_of_memory(name: str, error: BaseException) -> bool:
        """Record an allocation failure as the status of ``name`` (True); re-raise any other error."""
        if not is_out_of_memory(error):
            raise error
        results[name] = {"status": "OOM", "note": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        return True

    for name, call in calls.items():
        oom = False
        try:
            calls_left = max(warmup, 1)
            start = time.perf_counter()
            call()  # the first call (lazy initialisation, torch.compile) is left out of the time per call
            _sync(device)
            first, count = time.perf_counter() - start, 1
            start = time.perf_counter()
            while count < calls_left and time.perf_counter() - start <= max_seconds:
                call()
                _sync(device)
                count += 1
            per_call = (time.perf_counter() - start) / (count - 1) if count > 1 else first
        except ValueError as error:  # e.g. "does not support periodic cells"
            results[name] = {"status": "n/a", "note": str(error)}
            continue
        except (RuntimeError, MemoryError) as error:
            oom = out_of_memory(name, error)
        if oom:
            free_memory(device)
            continue
        if per_call > max_seconds:
            results[name] = {"status": "skipped", "note": f"one call took {per_call:.0f} s > max_seconds"}
            continue
        results[name] = {"status": "ok", "samples": [], "repeats": int(min(repeats, max(3, max_seconds // per_call)))}
        active[name] = call
    rounds = max((r["repeats"] for r in results.values() if r["status"] == "ok"), default=0)
    for round_ in range(rounds):
        order = list(active.items())
        if round_ % 2:
            order.reverse()
        for name, call in order:
            if len(results[name]["samples"]) >= results[name]["repeats"]:
                continue
            oom = False
            try:
                if device.type == "cuda":
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                call()
                _sync(device)
                if device.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                    results[name]["peak_mb"] = max(peak, results[name].get("peak_mb", 0.0))
            except (RuntimeError, MemoryError) as error:
                oom = out_of_memory(name, error)
            if oom:
                del active[name]
                free_memory(device)
                continue
            results[name]["samples"].append(time.perf_counter() - start)
    for result in results.values():
        if result["status"] == "ok":
            result["median_s"] = statistics.median(result["samples"])
            result["min_s"] = min(result["samples"])
    return results


def time_models(models: Dict[str, nn.Module], system: Mapping[str, Any], repeats: int = 20, warmup: int = 3,
                max_seconds: float = 60.0, device: str = "cpu") -> Dict[str, Dict[str, Any]]:
    """:func:`interleaved_timings` of energy+forces (neighbour list included) of each model on ``system``."""
    calls = {name: functools.partial(energy_and_forces, model, system) for name, model in models.items()}
    return interleaved_timings(calls, repeats, warmup, max_seconds, device)


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
    ``reference``, parameter count and peak memory (``memory``: in a fresh process, :func:`peak_memory`; on
    CUDA also ``peak_mb`` in this process). A model that runs out of memory is reported as ``OOM`` and not
    run again on larger systems in the same dtype; the other models go on."""
    from tqdm.auto import tqdm

    rows: List[Dict[str, Any]] = []
    out_of_memory_at: Dict[tuple, int] = {}  # (model, dtype) -> fewest atoms that ran out of memory
    cases = [(s, d) for s in systems for d in dtypes]
    for system_name, dtype_name in tqdm(cases, desc="speed", disable=not progress):
        dtype = getattr(torch, dtype_name)
        system = _cast(systems[system_name], dtype, torch.device(device))
        num_graphs = int(system["num_graphs"])
        num_atoms = int(system["z"].numel())
        models = {name: build_bench_model(cfg, elements, avg_num_neighbors).to(device, dtype)
                  for name, cfg in model_configs.items()}
        too_large = {name: out_of_memory_at[(name, dtype_name)] for name in models
                     if out_of_memory_at.get((name, dtype_name), num_atoms + 1) <= num_atoms}
        timings = time_models({n: m for n, m in models.items() if n not in too_large}, system, repeats, warmup,
                              max_seconds, device)
        timings.update({name: {"status": "OOM", "note": f"not run: out of memory at {atoms:,} atoms"}
                        for name, atoms in too_large.items()})
        ref = timings.get(reference, {}).get("median_s")
        for name in models:
            result = timings[name]
            row = {"system": system_name, "atoms": num_atoms, "structures": num_graphs, "dtype": dtype_name,
                   "model": name, "parameters": sum(p.numel() for p in models[name].parameters()),
                   "status": result["status"], "note": result.get("note", "")}
            if result["status"] == "OOM" and name not in too_large:
                out_of_memory_at[(name, dtype_name)] = num_atoms
            if result["status"] == "ok":
                row.update({
                    "ms_per_structure": 1e3 * result["median_s"] / num_graphs,
                    "ms_per_structure_min": 1e3 * result["min_s"] / num_graphs,
                    "us_per_atom": 1e6 * result["median_s"] / num_atoms,
                    "repeats": len(result["samples"]),
                    "ratio_to_reference": result["median_s"] / ref if ref else None,
                })
                if "peak_mb" in result:
                    row["peak_mb"] = result["peak_mb"]
                if memory:
                    row.update(peak_memory(model_configs[name], elements, avg_num_neighbors, systems[system_name],
                                           dtype, device))
            rows.append(row)
        del models, system
        free_memory(torch.device(device))
    return rows
