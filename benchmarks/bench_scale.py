"""Energy + forces of large periodic fcc Cu boxes on CPU: time and peak memory per atom.

Each size runs in a fresh subprocess, so the peak resident memory (``ru_maxrss``) belongs to that
size alone; the table reports the increase of the peak over the memory before the first evaluation
(model and structure loaded). Times: neighbour list (vesin, cutoff + 0.5 Å skin as in the ASE
calculator) and one energy+forces evaluation of the scripted model (median of the repeats).

    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py                 # 1000, 10000, 50000 atoms
    python benchmarks/bench_scale.py --sizes 1000 --dtype float32 --model examples/models/cu_emt_equireann.pt
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: supercell repeats of the 4-atom cubic fcc cell giving exactly these sizes
REPEATS = {1000: (5, 5, 10), 10000: (10, 10, 25), 50000: (25, 25, 20), 100000: (25, 25, 40)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(size: int, model_path: str, dtype: str, repeats: int, skin: float) -> dict:
    import numpy as np
    import torch
    from ase.build import bulk

    from pyg_equireann.deploy.ase import load_potential
    from pyg_equireann.graph.neighbors import radius_graph_pbc

    potential = load_potential(model_path, "cpu", dtype)
    atoms = bulk("Cu", "fcc", a=3.59, cubic=True).repeat(REPEATS[size])
    atoms.rattle(0.05, seed=0)
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array)
    z = torch.tensor(atoms.numbers)
    model_dtype = potential.dtype

    start = time.perf_counter()
    edge_index, offsets = radius_graph_pbc(pos, potential.cutoff + skin, None, cell, None)
    neighbor_seconds = time.perf_counter() - start
    within = int((torch.linalg.vector_norm(pos[edge_index[0]] - pos[edge_index[1]] + offsets @ cell, dim=1)
                  <= potential.cutoff).sum())
    base_mb = current_rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = potential(z, pos.to(model_dtype), edge_index, offsets, cell)
        energy = float(out["energy"][0])
        forces = out["forces"]
        times.append(time.perf_counter() - start)
        del out
    assert np.isfinite(energy) and bool(torch.isfinite(forces).all())
    return {"atoms": size, "edges": int(edge_index.shape[1]), "edges_within_cutoff": within,
            "neighbor_s": neighbor_seconds, "eval_s": statistics.median(times), "eval_s_all": times,
            "base_mb": base_mb, "peak_mb": rss_mb(), "dtype": str(model_dtype), "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000], choices=sorted(REPEATS))
    parser.add_argument("--model", default=str(ROOT / "examples/models/cu_emt_equireann.pt"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="evaluations per size (median); 1 warm-up extra")
    parser.add_argument("--skin", type=float, default=0.5)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.dtype, args.repeats + 1, args.skin)))
        return

    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--worker", str(size), "--model", args.model, "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--skin", str(args.skin)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{size} atoms failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            break
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["eval_s"] = statistics.median(row["eval_s_all"][1:])  # drop the warm-up (TorchScript profiling)
        rows.append(row)
        print(f"done {size}: {row}", file=sys.stderr, flush=True)

    first = rows[0]
    first_us = 1e6 * first["eval_s"] / first["atoms"]
    first_kb = 1024 * (first["peak_mb"] - first["base_mb"]) / first["atoms"]
    print(f"model {args.model}, {first['dtype']}, {first['threads']} threads, cutoff + skin {args.skin} Å")
    print("| atoms | edges/atom (list / within cutoff) | neighbour list (s) | energy+forces (s) | µs/atom | "
          "time/atom vs first | peak extra memory (MB) | KB/atom | memory/atom vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        n = row["atoms"]
        us = 1e6 * row["eval_s"] / n
        extra = row["peak_mb"] - row["base_mb"]
        kb = 1024 * extra / n
        print(f"| {n} | {row['edges'] / n:.1f} / {row['edges_within_cutoff'] / n:.1f} | {row['neighbor_s']:.2f} | "
              f"{row['eval_s']:.2f} | {us:.0f} | {us / first_us:.2f} | {extra:.0f} | {kb:.1f} | {kb / first_kb:.2f} |")


if __name__ == "__main__":
    main()
