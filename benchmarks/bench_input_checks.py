"""Cost of the per-call input checks (unknown elements, non-finite positions, overlapping atoms) of
``energy_forces_stress`` (``check=True``, the default; training runs ``check=False``).

Times energy + forces on a batch of rMD17 aspirin frames with the checks on and off, alternating, in
one process, and prints the ratio. Usage: ``python benchmarks/bench_input_checks.py``.
"""
import time
from pathlib import Path

import numpy as np
import torch

from pyg_equireann import EquiREANN, energy_forces_stress
from pyg_equireann.graph.neighbors import build_graph

DATA = Path(__file__).resolve().parents[1] / "data" / "rmd17" / "rmd17_aspirin_train_01.npz"


def main(batch_size: int = 10, repeats: int = 100) -> None:
    torch.set_num_threads(1)
    d = np.load(DATA)
    z = torch.as_tensor(d["nuclear_charges"]).repeat(batch_size)
    pos = torch.as_tensor(d["coords"][:batch_size], dtype=torch.float32).reshape(-1, 3)
    batch = torch.arange(batch_size).repeat_interleave(len(d["nuclear_charges"]))
    model = EquiREANN(elements=[1, 6, 8], avg_num_neighbors=10.0)
    edge_index, _ = build_graph(pos, model.cutoff, batch)
    def step(check: bool):
        energy_forces_stress(model, z, pos, batch, edge_index=edge_index, num_graphs=batch_size, check=check)

    times = {"checks on": [], "checks off": []}
    for _ in range(3):
        step(True)
    for _ in range(repeats):
        for name in times:
            t0 = time.perf_counter()
            step(name == "checks on")
            times[name].append(time.perf_counter() - t0)
    on, off = np.median(times["checks on"]), np.median(times["checks off"])
    print(f"aspirin x{batch_size}, float32, energy+forces, 1 thread: checks on {on * 1e3:.2f} ms, "
          f"off {off * 1e3:.2f} ms, ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
