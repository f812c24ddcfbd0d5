"""Benchmark the neighbour-list backends of pyg_equireann.graph.neighbors.

Times (median over interleaved repeats, after warm-up, torch.set_num_threads(2)):

* non-periodic: a batch of 32 rMD17 aspirin molecules (21 atoms each), cutoff 4 and 5 Å,
  with the ``torch``, ``vesin`` and (if importable) ``torch_cluster`` backends of
  ``radius_graph``;
* periodic: fcc Cu boxes of ~1000 and ~10000 atoms (small random displacements),
  cutoff 4 Å, with ``radius_graph_pbc`` (vesin);
* for reference, the same Cu atoms as one non-periodic graph with every ``radius_graph``
  backend (the ``torch`` backend hands graphs above ``TORCH_MAX_GRAPH_ATOMS`` to vesin).

With ``--sizes`` it instead compares the periodic search of periodic water boxes
(``pyg_equireann.experiments.bench.systems.water_box``, about N atoms each, cutoff 4 Å) and of a
batch of 32 small water boxes (one call per structure): the CPU vesin path (``backend="vesin"``,
float64 host copies) against vesin-torch on ``--device`` (``backend="vesin_torch"``), reporting ms
per call and µs per atom (CUDA calls are synchronised; repeats shrink for slow calls so 1M atoms
through the CPU path stays affordable), plus the aspirin batches of ``--molecules`` molecules with
the ``torch`` and ``vesin_torch`` backends on ``--device``. ``--model`` adds EquiREANN's
energy+forces (``energy_forces_stress``) with the list built inside (``"auto"``) and given, so the
list's share of a call can be read off.

Usage::

    python benchmarks/bench_neighbors.py --repeats 30
    python benchmarks/bench_neighbors.py --sizes 1000 10000 100000 --threads 1
    python benchmarks/bench_neighbors.py --device cuda --sizes 10000 100000 1000000 --model
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyg_equireann.graph import neighbors as nb  # noqa: E402


def find_aspirin() -> Path:
    for p in (REPO / "data/rmd17/rmd17_aspirin_train_01.npz", REPO / "../shared/data/rmd17/rmd17_aspirin_train_01.npz"):
        if p.exists():
            return p.resolve()
    raise FileNotFoundError("rmd17_aspirin_train_01.npz not found in data/rmd17/ or ../shared/data/rmd17/")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_interleaved(fns: dict, repeats: int, stat: str = "median", target_s: float = 0.005) -> dict:
    """ms per call of each fn (median or min over repeats); calls are interleaved across fns."""
    inner = {}
    for name, fn in fns.items():  # warm-up + choose calls per sample (~target_s each)
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, min(200, int(target_s / max(dt, 1e-7))))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            k = inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k * 1e3)
    reduce = statistics.median if stat == "median" else min
    return {name: reduce(v) for name, v in samples.items()}


def cu_box(reps, seed):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(reps)
    rng = np.random.default_rng(seed)
    pos = atoms.positions + rng.normal(0.0, 0.05, atoms.positions.shape)
    return torch.tensor(pos), torch.tensor(atoms.cell.array)


def time_adaptive(fns: dict, repeats: int, sync, budget_s: float = 20.0) -> dict:
    """Median ms per call of each fn, interleaved; fewer repeats (at least 3) for slow calls."""
    for fn in fns.values():  # warm-up (CUDA kernels compiled, buffers allocated)
        fn()
        sync()
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - t0
    rounds = max(3, min(repeats, int(budget_s / max(sum(first.values()), 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def water_batch(num_structures: int, atoms_each: int, dtype, device):
    """``num_structures`` water boxes of ~``atoms_each`` atoms (different seeds) as one batch:
    z (N,), pos (N, 3), batch (N,), cell (B, 3, 3)."""
    from pyg_equireann.experiments.bench.systems import water_box

    boxes = [water_box(atoms_each, seed=k) for k in range(num_structures)]
    z = torch.cat([b["z"] for b in boxes]).to(device)
    pos = torch.cat([b["pos"] for b in boxes]).to(device, dtype)
    batch = torch.cat([torch.full((b["pos"].shape[0],), k) for k, b in enumerate(boxes)]).to(device)
    cell = torch.cat([b["cell"] for b in boxes]).to(device, dtype)
    return z, pos, batch, cell


def model_share(z, pos, batch, cell, repeats: int, sync) -> tuple:
    """(ms of EquiREANN energy+forces with the neighbour list built inside (backend "auto"), ms with
    the list given) through ``energy_forces_stress``; default EquiREANN, cutoff 4 Å, untrained.
    NaN (printed as nan) when the GPU runs out of memory."""
    from pyg_equireann import EquiREANN, energy_forces_stress

    torch.manual_seed(0)
    model = EquiREANN(cutoff=4.0, elements=(1, 8), avg_num_neighbors=25.0).to(pos.device, pos.dtype)
    ei, off = nb.build_graph(pos, 4.0, batch, cell)
    fns = {"built": lambda: energy_forces_stress(model, z, pos, batch, cell),
           "given": lambda: energy_forces_stress(model, z, pos, batch, cell, edge_index=ei, cell_offsets=off)}
    try:
        res = time_adaptive(fns, repeats, sync)
    except torch.cuda.OutOfMemoryError:  # the model does not fit at this size: report it, go on
        return float("nan"), float("nan")
    return res["built"], res["given"]


def device_tables(args, dtype) -> None:
    """Periodic water boxes and aspirin batches: CPU vesin path vs vesin-torch on args.device."""
    import vesin

    from pyg_equireann.experiments.bench.systems import aspirin_batch

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    vt_ver = "not installed"
    if nb.vesin_torch_available():
        import vesin_torch

        vt_ver = vesin_torch.__version__
    print(f"# bench_neighbors --sizes: {time.strftime('%Y-%m-%d %H:%M')} | device {device} ({name}) | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads) | vesin {vesin.__version__} | vesin-torch {vt_ver} | "
          f"dtype {args.dtype} | median of <= {args.repeats} interleaved repeats | load avg {os.getloadavg()[0]:.2f}")
    print()
    print("| system | atoms | edges | vesin (CPU path) ms | vesin_torch ms | vesin µs/atom | vesin_torch µs/atom | vesin / vesin_torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    systems = [(f"water box ~{n}", 1, n) for n in args.sizes] + [("32 water boxes of ~96 (batch)", 32, 96)]
    shares = []
    for label, count, each in systems:
        z, pos, batch, cell = water_batch(count, each, dtype, device)
        fns = {b: (lambda b=b: nb.radius_graph_pbc(pos, 4.0, batch, cell, backend=b)) for b in ("vesin", "vesin_torch")}
        ref = fns["vesin"]()
        got = fns["vesin_torch"]()
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"{label}: vesin_torch disagrees with vesin"
        n, e = pos.shape[0], ref[0].shape[1]
        del ref, got
        res = time_adaptive(fns, args.repeats, sync)
        us = {b: res[b] * 1e3 / n for b in res}
        print(f"| {label} | {n} | {e} | {res['vesin']:.3f} | {res['vesin_torch']:.3f} | {us['vesin']:.3f} | "
              f"{us['vesin_torch']:.4f} | {res['vesin'] / res['vesin_torch']:.2f}× |", flush=True)
        if args.model:
            shares.append((label, n, res["vesin_torch"], *model_share(z, pos, batch, cell, args.repeats, sync)))
    if shares:
        print()
        print("| system | atoms | vesin_torch list ms | energy+forces, list built (auto) ms | list given ms | "
              "list / built | (built - given) / built |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, n, t_nl, t_built, t_given in shares:
            print(f"| {label} | {n} | {t_nl:.3f} | {t_built:.3f} | {t_given:.3f} | {t_nl / t_built:.0%} | "
                  f"{(t_built - t_given) / t_built:.0%} |")
    print()
    print("| system | atoms | edges | torch ms | vesin_torch ms | vesin_torch / torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in args.molecules:
        b = aspirin_batch(m)
        pos, batch = b["pos"].to(device, dtype), b["batch"].to(device)
        fns = {k: (lambda k=k: nb.radius_graph(pos, 5.0, batch, backend=k)) for k in ("torch", "vesin_torch")}
        ref = fns["torch"]()
        assert torch.equal(fns["vesin_torch"](), ref), "vesin_torch disagrees with torch"
        res = time_adaptive(fns, args.repeats, sync)
        print(f"| aspirin ×{m}, rc=5 Å | {pos.shape[0]} | {ref.shape[1]} | {res['torch']:.3f} | {res['vesin_torch']:.3f} | "
              f"{res['vesin_torch'] / res['torch']:.2f}× |", flush=True)
    print()
    print(f"# load avg after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="interleaved timing repeats (median reported)")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="statistic over repeats")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--no-large-nonperiodic", action="store_true", help="skip the Cu-as-one-molecule rows")
    ap.add_argument("--sizes", type=int, nargs="+", help="water boxes of about these many atoms: vesin vs vesin_torch")
    ap.add_argument("--device", default="cpu", help="device of the positions for --sizes (cpu, cuda)")
    ap.add_argument("--molecules", type=int, nargs="*", default=[32, 512],
                    help="with --sizes: aspirin batches of these many molecules, torch vs vesin_torch")
    ap.add_argument("--model", action="store_true",
                    help="with --sizes: also time EquiREANN energy+forces with the list built (auto) and given")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.sizes:
        device_tables(args, dtype)
        return
    has_tc = nb.torch_cluster_available()
    backends = ["torch", "vesin"] + (["torch_cluster"] if has_tc else [])

    data = np.load(find_aspirin())
    z = data["nuclear_charges"]
    pos_asp = torch.tensor(data["coords"][:32].reshape(-1, 3), dtype=dtype)
    batch_asp = torch.arange(32).repeat_interleave(len(z))

    tc_ver = "not installed"
    if has_tc:
        import torch_cluster

        tc_ver = torch_cluster.__version__
    import vesin

    print(f"# bench_neighbors: {time.strftime('%Y-%m-%d %H:%M')} | {cpu_name()} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads) | vesin {vesin.__version__} | "
          f"torch_cluster {tc_ver} | dtype {args.dtype} | {args.stat} of {args.repeats} repeats | "
          f"load avg {os.getloadavg()[0]:.2f}")
    print()

    rows = []  # (case, edges, {backend: ms})

    for cutoff in (4.0, 5.0):
        fns = {b: (lambda b=b: nb.radius_graph(pos_asp, cutoff, batch_asp, backend=b)) for b in backends}
        ref = fns["torch"]()
        for b in backends[1:]:
            assert torch.equal(fns[b](), ref), f"backend {b} disagrees with torch"
        rows.append((f"aspirin 32×21 atoms, non-periodic, rc={cutoff:g} Å", ref.shape[1], time_interleaved(fns, args.repeats, args.stat)))

    boxes = [((6, 6, 7), "Cu fcc"), ((14, 14, 13), "Cu fcc")]
    for reps, label in boxes:
        pos, cell = cu_box(reps, seed=0)
        pos, cell = pos.to(dtype), cell.to(dtype)
        n = pos.shape[0]
        fn = lambda: nb.radius_graph_pbc(pos, 4.0, None, cell)  # noqa: E731
        ei, _ = fn()
        rows.append((f"{label} {n} atoms, periodic, rc=4 Å (radius_graph_pbc)", ei.shape[1], time_interleaved({"vesin": fn}, args.repeats, args.stat)))
        if not args.no_large_nonperiodic:
            fns = {b: (lambda b=b: nb.radius_graph(pos, 4.0, None, backend=b)) for b in backends}
            ref = fns["torch"]()
            for b in backends[1:]:
                assert torch.equal(fns[b](), ref), f"backend {b} disagrees with torch"
            rows.append((f"{label} {n} atoms as one non-periodic graph, rc=4 Å", ref.shape[1], time_interleaved(fns, args.repeats, args.stat)))

    print(f"# load avg after: {os.getloadavg()[0]:.2f}")
    print()
    cols = ["torch", "vesin", "torch_cluster"]
    print(f"{args.stat} ms per call:")
    print()
    print("| case | edges | torch ms | vesin ms | torch_cluster ms | vesin / torch | torch_cluster / torch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, edges, res in rows:
        cells = [f"{res[c]:.3f}" if c in res else ("n/a" if c != "torch_cluster" or has_tc else "not installed") for c in cols]
        ratios = []
        for c in ("vesin", "torch_cluster"):
            ratios.append(f"{res[c] / res['torch']:.2f}×" if c in res and "torch" in res else "—")
        print(f"| {case} | {edges} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print()
    print(f"torch backend: graphs > TORCH_MAX_GRAPH_ATOMS = {nb.TORCH_MAX_GRAPH_ATOMS} atoms go to vesin; "
          "ratios < 1 mean faster than the torch backend.")


if __name__ == "__main__":
    main()
