"""Energy+forces speed of EquiREANN, its passing-off and learned-passing variants, REANN and PyG's SchNet, side by side.

Usage: python benchmarks/bench_models.py [--batch 32] [--repeats 30] [--dtype float32] [--threads 2]

All models run in one process, interleaved (A, B, C, D, then D, C, B, A, …) after a warm-up; each
sample is one energy+forces evaluation of the whole batch including the neighbour list. The table
reports the median per structure and ratios measured in this run.
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch_geometric.nn.models import SchNet

from pyg_equireann import REANN, EquiREANN
from pyg_equireann.models.pyg import RadiusInteractionGraph

ROOT = Path(__file__).resolve().parents[1]


def load_aspirin(batch: int, dtype):
    path = ROOT / "data" / "rmd17" / "rmd17_aspirin_train_01.npz"
    d = np.load(path)
    z = torch.as_tensor(d["nuclear_charges"], dtype=torch.long)
    pos = torch.as_tensor(d["coords"][:batch], dtype=dtype)
    return z.repeat(batch), pos.reshape(-1, 3), torch.arange(batch).repeat_interleave(len(z))


def energy_and_forces(model, z, pos, batch):
    pos = pos.detach().requires_grad_(True)
    energy = model(z, pos, batch)
    forces = -torch.autograd.grad(energy.sum(), pos)[0]
    return energy, forces


def build_models():
    torch.manual_seed(0)
    return {
        "EquiREANN": EquiREANN(),
        "EquiREANN (passing off)": EquiREANN(equivariant_passing=False),
        "EquiREANN (learned passing)": EquiREANN(learnable_passing=True, passing_init="alternating"),
        "REANN": REANN(),
        "SchNet (128×6, rc 5)": SchNet(hidden_channels=128, num_interactions=6, cutoff=5.0,
                                       interaction_graph=RadiusInteractionGraph(5.0)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    z, pos, batch = load_aspirin(args.batch, dtype)
    models = {name: m.to(dtype) for name, m in build_models().items()}
    times = {name: [] for name in models}
    for _ in range(args.warmup):
        for model in models.values():
            energy_and_forces(model, z, pos, batch)
    for repeat in range(args.repeats):
        order = list(models.items())
        if repeat % 2:  # alternate the order so no model always follows the same one
            order.reverse()
        for name, model in order:
            start = time.perf_counter()
            energy_and_forces(model, z, pos, batch)
            times[name].append(time.perf_counter() - start)
    ref = statistics.median(times["EquiREANN"])
    print(f"aspirin ×{args.batch}, {args.dtype}, {args.threads} threads, energy+forces incl. neighbour list, "
          f"median of {args.repeats} interleaved repeats, torch {torch.__version__}")
    print()
    print("| model | parameters | ms / structure (median) | ms / structure (min) | time ÷ EquiREANN (median) |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        med = statistics.median(samples)
        params = sum(p.numel() for p in models[name].parameters())
        print(f"| {name} | {params:,} | {1e3 * med / args.batch:.3f} | {1e3 * min(samples) / args.batch:.3f} "
              f"| {med / ref:.2f} |")
    off = statistics.median(times["EquiREANN (passing off)"])
    schnet = statistics.median(times["SchNet (128×6, rc 5)"])
    print()
    learned = statistics.median(times["EquiREANN (learned passing)"])
    print(f"passing on / passing off = {ref / off:.3f} (target ≤ 1.10)")
    print(f"learned passing / passing on = {learned / ref:.3f}")
    print(f"SchNet / EquiREANN = {schnet / ref:.2f} (target ≥ 5.5)")


if __name__ == "__main__":
    main()
