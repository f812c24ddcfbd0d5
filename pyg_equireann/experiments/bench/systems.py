"""Benchmark systems: a batch of rMD17 aspirin molecules and periodic liquid-water-like boxes."""
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

WATER_VOLUME = 29.9  # Å³ per molecule at 1 g/cm³


def aspirin_batch(num_molecules: int = 32, data_root: Optional[str] = None) -> Dict[str, Tensor]:
    """``num_molecules`` rMD17 aspirin frames (split 01 training file) as one batch:
    ``z`` (N,), ``pos`` (N, 3) Å float64, ``batch`` (N,), no cell."""
    from pyg_equireann.datamodules.base import data_root_hint, default_data_root

    root = Path(data_root) if data_root else default_data_root()
    path = root / "rmd17" / "rmd17_aspirin_train_01.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the aspirin benchmark reads rMD17 split 01 from the data folder"
                                + data_root_hint(path))
    data = np.load(path)
    z = torch.as_tensor(data["nuclear_charges"], dtype=torch.long)
    pos = torch.as_tensor(data["coords"][:num_molecules], dtype=torch.float64)
    return {"z": z.repeat(num_molecules), "pos": pos.reshape(-1, 3),
            "batch": torch.arange(num_molecules).repeat_interleave(len(z)), "num_graphs": num_molecules}


def water_box(num_atoms: int, seed: int = 0) -> Dict[str, Tensor]:
    """A periodic cubic box of randomly oriented rigid water molecules on a simple cubic lattice at
    1 g/cm³ with about ``num_atoms`` atoms (m³ molecules, m = round((num_atoms/3)^(1/3))), built with
    ASE. Returns ``z``, ``pos`` (Å, float64), ``batch``, ``cell`` (1, 3, 3), ``pbc`` (1, 3)."""
    from ase.build import molecule

    m = max(1, int(round((num_atoms / 3) ** (1 / 3))))
    spacing = WATER_VOLUME ** (1 / 3)
    rng = np.random.default_rng(seed)
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    q = rng.normal(size=(m**3, 4))  # one random unit quaternion per molecule
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    rot = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                    2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                    2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=1).reshape(-1, 3, 3)
    sites = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    positions = np.einsum("ad,mkd->mak", water.positions, rot) + spacing * (sites + 0.5)
    numbers = np.tile(water.numbers, m**3)
    pos = torch.as_tensor(positions.reshape(-1, 3), dtype=torch.float64)
    z = torch.as_tensor(numbers, dtype=torch.long)
    cell = torch.eye(3, dtype=torch.float64).unsqueeze(0) * (spacing * m)
    return {"z": z, "pos": pos, "batch": torch.zeros(len(z), dtype=torch.long), "cell": cell,
            "pbc": torch.ones(1, 3, dtype=torch.bool), "num_graphs": 1}


def build_system(name: str, data_root: Optional[str] = None) -> Dict[str, Tensor]:
    """``aspirin32`` (or ``aspirin<N>``) or ``water<N>`` (about N atoms, periodic)."""
    if name.startswith("aspirin"):
        return aspirin_batch(int(name[len("aspirin"):] or 32), data_root)
    if name.startswith("water"):
        return water_box(int(name[len("water"):]))
    raise ValueError(f"unknown benchmark system {name!r}: use aspirin<N molecules> or water<N atoms>")
