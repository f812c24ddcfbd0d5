"""A short, real training run: EquiREANN on the shipped rMD17 ethanol data (`make train`).

Trains on 950 frames of the rMD17 ethanol training split 01 (50 held out for validation), tests on
frames of the separate test split, and prints energy and force MAE. The full Lightning/Hydra
pipeline (``equireann-train``) supersedes this for real work.

Usage: python -m pyg_equireann.quick_train [--minutes 4] [--test-frames 1000] [--out runs/quick_train]
"""
import argparse
import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from ase.units import kcal, mol
from torch_geometric.data import Batch, Data
from tqdm import tqdm

from . import EquiREANN, compute_statistics, energy_forces_stress

DATA = Path(__file__).resolve().parents[1] / "data" / "rmd17"
KCAL_MOL = kcal / mol  # eV per kcal/mol


def load_rmd17(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the rMD17 ethanol split-01 files ship in data/rmd17/")
    d = np.load(path)
    z = torch.as_tensor(d["nuclear_charges"], dtype=torch.long)
    return [
        Data(z=z, pos=torch.as_tensor(c, dtype=torch.float32),
             energy=torch.tensor([float(e) * KCAL_MOL], dtype=torch.float64),
             forces=torch.as_tensor(f * KCAL_MOL, dtype=torch.float32))
        for c, e, f in zip(d["coords"], d["energies"], d["forces"])
    ]


def evaluate(model, frames, batch_size=100):
    e_err, f_err, n_atoms = [], [], []
    for start in range(0, len(frames), batch_size):
        b = Batch.from_data_list(frames[start:start + batch_size])
        out = energy_forces_stress(model, b.z, b.pos, b.batch)
        e_err.append((out["energy"].detach() - b.energy).abs())
        f_err.append((out["forces"].detach() - b.forces).abs().flatten())
    return {"energy_mae_meV": 1e3 * float(torch.cat(e_err).mean()),
            "forces_mae_meV_per_A": 1e3 * float(torch.cat(f_err).mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget")
    parser.add_argument("--test-frames", type=int, default=1000)
    parser.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs")
    parser.add_argument("--num-train", type=int, default=950, help="training frames (the other 1000 - n validate, at most 50)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/quick_train"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    frames = load_rmd17(DATA / "rmd17_ethanol_train_01.npz")
    test = load_rmd17(DATA / "rmd17_ethanol_test_01.npz")[: args.test_frames]
    perm = torch.randperm(len(frames), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train = [frames[i] for i in perm[: args.num_train]]
    val = [frames[i] for i in perm[max(args.num_train, 950):]]

    model = EquiREANN(cutoff=4.0, elements=[1, 6, 8]).float()
    stats = compute_statistics(train, cutoff=model.cutoff)
    model.set_energy_statistics(**stats)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    run_dir = args.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({**vars(args), "out": str(args.out), **stats}, indent=2))

    budget = 60.0 * args.minutes
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    model.eval()
    log = [{"epoch": 0, "time_s": 0.0, **evaluate(model, val)}]
    best = (float("inf"), None)
    epoch = 0
    start = time.perf_counter()
    with tqdm(total=round(budget), unit="s", desc="training EquiREANN on rMD17 ethanol") as bar:
        while time.perf_counter() - start < budget and epoch < (args.max_epochs or float("inf")):
            model.train()
            order = torch.randperm(len(train)).tolist()
            for step in range(steps_per_epoch):
                b = Batch.from_data_list([train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]])
                out = energy_forces_stress(model, b.z, b.pos, b.batch, create_graph=True)
                n = torch.bincount(b.batch).double()
                loss_e = (((out["energy"] - b.energy) / n) ** 2).mean()
                loss_f = ((out["forces"] - b.forces) ** 2).mean()
                loss = (loss_e + 100.0 * loss_f).float()  # (eV/atom)² and (eV/Å)²
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            epoch += 1
            progress = min(1.0, (time.perf_counter() - start) / budget)
            if args.max_epochs:
                progress = max(progress, epoch / args.max_epochs)
            for group in optimizer.param_groups:  # cosine decay over the time budget
                group["lr"] = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
            model.eval()
            metrics = evaluate(model, val)
            log.append({"epoch": epoch, "time_s": time.perf_counter() - start, **metrics})
            if metrics["forces_mae_meV_per_A"] < best[0]:
                best = (metrics["forces_mae_meV_per_A"], {k: v.clone() for k, v in model.state_dict().items()})
            bar.set_postfix(epoch=epoch, val_F_MAE=f"{metrics['forces_mae_meV_per_A']:.1f} meV/Å")
            bar.n = min(round(budget), round(time.perf_counter() - start))
            bar.refresh()

    model.load_state_dict(best[1])
    model.eval()
    test_metrics = evaluate(model, test)
    tmp = run_dir / "model.pt.tmp"
    torch.save({"state_dict": model.state_dict(), "stats": stats}, tmp)
    os.replace(tmp, run_dir / "model.pt")
    (run_dir / "metrics.json").write_text(json.dumps({"test": test_metrics, "epochs": epoch, "log": log}, indent=2))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nEquiREANN on rMD17 ethanol: {epoch} epochs in {minutes:.1f} min, {len(test)} test frames")
    print(f"  test energy MAE: {test_metrics['energy_mae_meV']:.1f} meV")
    print(f"  test force MAE:  {test_metrics['forces_mae_meV_per_A']:.1f} meV/Å")
    print(f"  run folder: {run_dir}")


if __name__ == "__main__":
    main()
