"""Benchmark the neighbour-list backends of pyg_equireann.graph.neighbors.

Times (median over interleaved repeats, after warm-up, torch.set_num_threads(2)):

* non-periodic: a batch of 32 rMD17 aspirin molecules (21 atoms each), cutoff 4 and 5 Å,
  with the ``torch``, ``vesin`` and (if importable) ``torch_cluster`` backends of
  ``radius_graph``;
* periodic: fcc Cu boxes of ~1000 and ~10000 atoms (small random displacements),
  cutoff 4 Å, with ``radius_graph_pbc`` (vesin);
* for reference, the same Cu atoms as one non-periodic graph with every ``radius_graph``
  backend (the ``torch`` backend hands graphs above ``TORCH_MAX_GRAPH_ATOMS`` to vesin).

Usage::

    python benchmarks/bench_neighbors.py --repeats 30
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="interleaved timing repeats (median reported)")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="statistic over repeats")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--no-large-nonperiodic", action="store_true", help="skip the Cu-as-one-molecule rows")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
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
