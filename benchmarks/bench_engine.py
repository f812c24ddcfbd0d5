"""Energy + forces of EquiREANN eager against ``compile=true``, and with orbital passing against the passing-off
ablation, side by side in one process (docs/engine.md).

    python benchmarks/bench_engine.py --threads 1 --systems aspirin32 water10000 --repeats 15

Each model's first calls (compilation) are left out; then the calls are interleaved (A B C D, D C B A, ...)
and the median is printed per system, with the neighbour list given (built once) and, for aspirin, built
inside every call.
"""
import argparse
import statistics
import time

import torch

from pyg_equireann import EquiREANN, energy_forces_stress
from pyg_equireann.experiments.bench.systems import build_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--systems", nargs="+", default=["aspirin32", "water10000"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    for name in args.systems:
        system = build_system(name)
        z, pos, batch = system["z"].to(device), system["pos"].to(device, dtype), system["batch"].to(device)
        cell, pbc = system.get("cell"), system.get("pbc")
        cell = None if cell is None else cell.to(device, dtype)
        pbc = None if pbc is None else pbc.to(device)
        num_graphs = int(batch.max()) + 1 if cell is None else cell.view(-1, 3, 3).shape[0]
        elements = sorted(set(z.tolist()))
        models = {}
        for label, options in (("eager", {}), ("compiled", {"compile": True}), ("passing off", {"equivariant_passing": False}),
                               ("passing off, compiled", {"equivariant_passing": False, "compile": True})):
            torch.manual_seed(0)
            models[label] = EquiREANN(elements=elements, avg_num_neighbors=10.0, **options).to(device, dtype)
        edge_index, offsets = models["eager"].build_graph(pos, batch, cell, pbc)
        calls = {label: (lambda m=m: energy_forces_stress(m, z, pos, batch, cell, pbc, edge_index=edge_index,
                                                          cell_offsets=offsets, num_graphs=num_graphs))
                 for label, m in models.items()}
        if cell is None:
            calls["eager, neighbour list inside"] = lambda: energy_forces_stress(models["eager"], z, pos, batch)
            calls["compiled, neighbour list inside"] = lambda: energy_forces_stress(models["compiled"], z, pos, batch)
        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for call in calls.values():
            call(), call()
        times = {label: [] for label in calls}
        for r in range(args.repeats):
            for label in (list(calls) if r % 2 else list(calls)[::-1]):
                sync()
                start = time.perf_counter()
                calls[label]()
                sync()
                times[label].append(time.perf_counter() - start)
        ms = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        print(f"\n{name}: {pos.shape[0]} atoms, {edge_index.shape[1]} edges, {args.dtype}, {device}, {args.threads} thread(s), "
              f"median of {args.repeats}")
        for label, value in ms.items():
            print(f"  {label:34s} {value:9.2f} ms")
        print(f"  eager / compiled {ms['eager'] / ms['compiled']:.2f}; passing / passing off: eager "
              f"{ms['eager'] / ms['passing off']:.2f}, compiled {ms['compiled'] / ms['passing off, compiled']:.2f}")


if __name__ == "__main__":
    main()
