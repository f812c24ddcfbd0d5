"""Data module for any ASE-readable file of structures (extended XYZ first)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from . import cache as _cache
from .base import AtomicEnergiesSpec, PotentialDataModule, random_subset, subset
from .structures import StructureDataset, atoms_to_data, attach_edges, available_keys, dtype_name, harmonize_cells

PathLike = Union[str, os.PathLike]
TestFiles = Union[None, PathLike, Sequence[PathLike], Mapping[str, PathLike]]


def read_frames(path: Path, format: Optional[str] = None) -> list:
    """All frames of ``path`` with ``ase.io.read(path, index=":")``; clear errors for missing/empty files."""
    import ase.io

    if not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty (no structures)")
    try:
        frames = ase.io.read(str(path), index=":", format=format)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read structures with ase.io.read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(frames, list):
        frames = [frames]
    if len(frames) == 0:
        raise ValueError(f"{path}: file contains no structures")
    return frames


class XYZDataModule(PotentialDataModule):
    """Structures from ASE-readable files (extxyz, ...), energies in eV, forces eV/Å, stress eV/Å³.

    Args:
        train_file: training structures.
        val_file: validation structures; ``None``: a random ``val_fraction`` of ``train_file``.
        test_files: ``None``, a path (test set ``"test"``), a list of paths (named by file stem) or
            a dict ``{name: path}``.
        val_fraction, test_fraction: random fractions of ``train_file`` (drawn with ``seed``) used
            for validation (when no ``val_file``) and as an extra test set ``"test"``.
        energy_key, forces_key, stress_key: keys in ``atoms.info``/``atoms.arrays`` or the
            calculator results (ASE >= 3.23 moves ``energy``/``forces``/``stress`` there).
            ``forces_key=None``: energies only; ``stress_key=None``: ignore stress.
        atomic_energies: ``None``/``"fit"`` (least squares on the training set), path to a file
            of isolated atoms (energy of each single-atom frame), or ``{Z or symbol: eV}``.
        num_train, num_val, num_test: caps (random subsets drawn with ``seed``); ``num_test``
            applies to every test set.
        format: ASE file format (guessed from the extension when None).
        **kwargs: :class:`~datamodules.base.PotentialDataModule` arguments (cutoff, batch_size, ...).
    """

    def __init__(
        self,
        train_file: PathLike,
        val_file: Optional[PathLike] = None,
        test_files: TestFiles = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        energy_key: str = "energy",
        forces_key: Optional[str] = "forces",
        stress_key: Optional[str] = "stress",
        atomic_energies: AtomicEnergiesSpec = None,
        num_train: Optional[int] = None,
        num_val: Optional[int] = None,
        num_test: Optional[int] = None,
        format: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(atomic_energies=atomic_energies, **kwargs)
        self.save_hyperparameters()
        if not 0.0 <= float(val_fraction) < 1.0 or not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        self.train_file = Path(train_file).expanduser()
        self.val_file = None if val_file is None else Path(val_file).expanduser()
        self.test_files = self._normalize_test_files(test_files)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.energy_key = energy_key
        self.forces_key = forces_key
        self.stress_key = stress_key
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.format = format

    @staticmethod
    def _normalize_test_files(test_files: TestFiles) -> Dict[str, Path]:
        if test_files is None:
            return {}
        if isinstance(test_files, (str, os.PathLike)):
            return {"test": Path(test_files).expanduser()}
        if isinstance(test_files, Mapping):
            return {str(k): Path(v).expanduser() for k, v in test_files.items()}
        out: Dict[str, Path] = {}
        for p in test_files:
            p = Path(p).expanduser()
            if p.stem in out:
                raise ValueError(f"two test files share the name {p.stem!r}; pass a dict {{name: path}}")
            out[p.stem] = p
        return out

    # ------------------------------------------------------------------ processing
    def _process_file(self, path: Path, key: str) -> dict:
        """Read, validate and build graphs for every frame of ``path`` (the expensive, cached step)."""
        source = str(path)
        frames = read_frames(path, self.format)
        data_list = []
        it = tqdm(frames, desc=f"reading {path.name}", unit="struct", leave=False,
                  disable=not self.progress or len(frames) < 1000)
        for k, atoms in enumerate(it):
            data_list.append(atoms_to_data(atoms, k, source, self.dtype, self.energy_key, self.forces_key, self.stress_key))
        meta = {"num_frames": len(data_list)}
        # forces: all frames or none
        with_forces = [("forces" in d) for d in data_list]
        if any(with_forces) and not all(with_forces):
            k = with_forces.index(False)
            raise KeyError(
                f"{source}: frame {k}: no forces under key {self.forces_key!r} although other frames have them; "
                f"available: {available_keys(frames[k], self.forces_key)}"
            )
        meta["has_forces"] = bool(all(with_forces))
        meta["per_atom_keys"] = sorted(k for k in frames[0].arrays if k not in ("numbers", "positions"))
        meta["calc_keys"] = sorted((getattr(frames[0].calc, "results", {}) or {}) if frames[0].calc is not None else {})
        with_stress = [("stress" in d) for d in data_list]
        if any(with_stress) and not all(with_stress):
            k = with_stress.index(False)
            raise KeyError(
                f"{source}: frame {k}: no stress under key {self.stress_key!r} although other frames have one; "
                "give every frame a stress or set stress_key=None"
            )
        meta["has_stress"] = bool(all(with_stress))
        harmonize_cells(data_list)
        attach_edges(data_list, self.cutoff, desc=f"graphs {path.name}", progress=self.progress, source=source)
        return StructureDataset.from_data_list(data_list, source, key, meta).to_state()


    def _dataset(self, path: Path) -> StructureDataset:
        path = path.expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"structure file not found: {path}")
        key = _cache.make_key(
            "xyz", _cache.file_fingerprint(path), self.cutoff, self.energy_key, self.forces_key,
            self.stress_key, dtype_name(self.dtype), self.format,
        )
        state = _cache.cached(path, path.stem, key, lambda: self._process_file(path, key), self.cache)
        return StructureDataset.from_state(state)

    # ------------------------------------------------------------------ splits
    def _load(self) -> Tuple[StructureDataset, StructureDataset, Dict[str, StructureDataset]]:
        full = self._dataset(self.train_file)
        if self.forces_key is not None and not full.meta.get("has_forces", False):
            import difflib

            keys = list(full.meta.get("per_atom_keys") or []) + list(full.meta.get("calc_keys") or [])
            close = difflib.get_close_matches(self.forces_key, keys, n=1, cutoff=0.6)
            raise KeyError(
                f"{full.source}: training file has no forces under key {self.forces_key!r}; per-atom arrays "
                f"{full.meta.get('per_atom_keys')}, calculator results {full.meta.get('calc_keys')}. "
                + (f"Did you mean forces_key={close[0]!r}? " if close else "")
                + "Set forces_key to the right key, or forces_key=None to train on energies only"
            )
        n = len(full)
        perm = np.random.default_rng(self.seed).permutation(n)
        n_test = int(round(self.test_fraction * n)) if self.test_fraction > 0 else 0
        if self.test_fraction > 0:
            n_test = max(n_test, 1)
        n_val = 0
        if self.val_file is None and self.val_fraction > 0:
            n_val = max(int(round(self.val_fraction * n)), 1)
        if n - n_test - n_val < 1:
            raise ValueError(
                f"{full.source}: {n} structures are too few for a random split with val_fraction "
                f"{self.val_fraction} and test_fraction {self.test_fraction}"
            )
        test_idx, val_idx, train_idx = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        if self.num_train is not None:
            if int(self.num_train) < 1:
                raise ValueError(f"num_train must be >= 1, got {self.num_train}")
            if int(self.num_train) > len(train_idx):
                raise ValueError(
                    f"num_train={self.num_train} but only {len(train_idx)} training structures are available in {full.source}"
                )
            train_idx = train_idx[: int(self.num_train)]
        train = subset(full, train_idx)
        val = self._dataset(self.val_file) if self.val_file is not None else subset(full, val_idx)
        val = random_subset(val, self.num_val, self.seed)

        tests: Dict[str, StructureDataset] = {}
        if n_test:
            tests["test"] = subset(full, test_idx)
        for name, path in self.test_files.items():
            if name in tests:
                raise ValueError(f"test set name {name!r} is used twice (random test split and test_files)")
            tests[name] = self._dataset(path)
        tests = {name: random_subset(ds, self.num_test, self.seed) for name, ds in tests.items()}
        return train, val, tests
