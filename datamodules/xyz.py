"""Data module for any ASE-readable file of structures (extended XYZ first)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache as _cache
from pyg_equireann.datamodules.base import AtomicEnergiesSpec, PotentialDataModule, data_root_hint, random_subset, subset
from pyg_equireann.datamodules.structures import (StructureDataset, atoms_to_data, attach_edges, available_keys,
                                                  harmonize_cells, plain_hparams)
from pyg_equireann.utils import dtype_name

PathLike = Union[str, os.PathLike]
TestFiles = Union[None, PathLike, Sequence[Union[PathLike, Mapping[str, Any]]], Mapping[str, Union[PathLike, Mapping[str, Any]]]]
#: settings a test set may give in its ``{path: ..., ...}`` form (the keys default to the module's)
TEST_SET_KEYS = ("path", "select", "energy_key", "forces_key", "stress_key", "format")
#: config type of frames without the ``config_type_key`` info field in a file where other frames have it (as MACE)
DEFAULT_CONFIG_TYPE = "Default"


def _matches(value: Any, wanted: Any) -> bool:
    """``value`` (an ``atoms.info`` entry) equals ``wanted`` or one of its entries (compared as text too,
    as extxyz parses ``1`` to an int and a command line may give ``"1"``)."""
    options = wanted if isinstance(wanted, (list, tuple)) else [wanted]
    return value is not None and any(value == w or str(value) == str(w) for w in options)


def read_frames(path: Path, format: Optional[str] = None) -> list:
    """All frames of ``path`` with ``ase.io.read(path, index=":")``; clear errors for missing/empty files."""
    import ase.io

    if not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}{data_root_hint(path)}")
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
            a dict ``{name: path}``. Instead of a path, a test set may be a dict
            ``{path: ..., select: {info_key: value or [values]}, energy_key: ..., forces_key: ...,
            stress_key: ..., format: ...}``: only the frames whose ``atoms.info`` matches ``select``,
            and its own keys (default: the module's), e.g.
            ``{md: {path: all.xyz, select: {config_type: md}}, scan: {path: scan.xyz, energy_key: E_dft}}``.
        val_fraction, test_fraction: random fractions of ``train_file`` (drawn with ``seed``) used
            for validation (when no ``val_file``) and as an extra test set ``"test"``.
        energy_key, forces_key, stress_key: keys in ``atoms.info``/``atoms.arrays`` or the
            calculator results (ASE >= 3.23 moves ``energy``/``forces``/``stress`` there).
            ``forces_key=None``: energies only; ``stress_key=None``: ignore stress.
        config_type_key: ``atoms.info`` field whose values group the test metrics (reported per
            value for every test set with at least two; frames without it count as ``"Default"``);
            ``None``: no grouping.
        atomic_energies: ``None``/``"fit"`` (least squares on the training set), path to a file
            of isolated atoms (energy of each single-atom frame), or ``{Z or symbol: eV}``.
        num_train, num_val, num_test: caps (random subsets drawn with ``seed``); ``num_test``
            applies to every test set.
        format: ASE file format (guessed from the extension when None).
        **kwargs: :class:`~pyg_equireann.datamodules.base.PotentialDataModule` arguments (cutoff, batch_size, ...).

    Without ``train_file`` the module holds only the test sets (``setup("test")``): enough to evaluate
    a checkpoint, which carries its own E0 and scaling, on new files.
    """

    def __init__(
        self,
        train_file: Optional[PathLike] = None,
        val_file: Optional[PathLike] = None,
        test_files: TestFiles = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        energy_key: str = "energy",
        forces_key: Optional[str] = "forces",
        stress_key: Optional[str] = "stress",
        config_type_key: Optional[str] = "config_type",
        atomic_energies: AtomicEnergiesSpec = None,
        num_train: Optional[int] = None,
        num_val: Optional[int] = None,
        num_test: Optional[int] = None,
        format: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(atomic_energies=atomic_energies, **kwargs)
        self.save_hyperparameters()
        plain_hparams(self)  # plain types only: checkpoints load with torch.load(weights_only=True)
        if not 0.0 <= float(val_fraction) < 1.0 or not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        self.train_file = None if train_file is None else Path(train_file).expanduser()
        self.val_file = None if val_file is None else Path(val_file).expanduser()
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.energy_key = energy_key
        self.forces_key = forces_key
        self.stress_key = stress_key
        self.config_type_key = config_type_key
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.format = format
        self.test_files = self._normalize_test_files(test_files)

    def _test_spec(self, name: str, spec: Union[PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
        """``{path, select, energy_key, forces_key, stress_key, format}`` of one test set."""
        out = {"path": None, "select": None, "energy_key": self.energy_key, "forces_key": self.forces_key,
               "stress_key": self.stress_key, "format": self.format}
        if isinstance(spec, (str, os.PathLike)):
            out["path"] = spec
        elif isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(TEST_SET_KEYS))
            if unknown:
                raise ValueError(f"test set {name!r}: unknown setting(s) {unknown}; allowed: {list(TEST_SET_KEYS)}")
            if spec.get("path") in (None, ""):
                raise ValueError(f"test set {name!r}: no 'path' given ({dict(spec)})")
            out.update(spec)
        else:
            raise ValueError(f"test set {name!r}: expected a path or a dict {{path: ..., select: ...}}, got {spec!r}")
        out["path"] = Path(out["path"]).expanduser()
        if out["select"] is not None and not isinstance(out["select"], Mapping):
            raise ValueError(f"test set {name!r}: select must be a dict {{info key: value or [values]}}, got {out['select']!r}")
        return out

    def _normalize_test_files(self, test_files: TestFiles) -> Dict[str, Dict[str, Any]]:
        if test_files is None:
            return {}
        if isinstance(test_files, (str, os.PathLike)):
            return {"test": self._test_spec("test", test_files)}
        if isinstance(test_files, Mapping):
            return {str(k): self._test_spec(str(k), v) for k, v in test_files.items()}
        out: Dict[str, Dict[str, Any]] = {}
        for p in test_files:
            spec = self._test_spec(str(p), p)
            name = Path(spec["path"]).stem
            if name in out:
                raise ValueError(f"two test files share the name {name!r}; pass a dict {{name: path}}")
            out[name] = spec
        return out

    # ------------------------------------------------------------------ processing
    def _process_file(self, path: Path, key: str, energy_key: str, forces_key: Optional[str],
                      stress_key: Optional[str], format: Optional[str], select: Optional[Mapping[str, Any]]) -> dict:
        """Read, validate and build graphs for every frame of ``path`` that matches ``select`` (the
        expensive, cached step)."""
        source = str(path)
        frames = read_frames(path, format)
        numbers = range(len(frames))
        if select:
            numbers = [k for k, atoms in enumerate(frames) if all(_matches(atoms.info.get(f), v) for f, v in select.items())]
            if not numbers:
                present = {f: sorted({str(a.info[f]) for a in frames if f in a.info})[:10] for f in select}
                raise ValueError(f"{source}: no frame matches select {dict(select)}; values in the file: {present}")
            frames = [frames[k] for k in numbers]
        data_list = []
        it = tqdm(frames, desc=f"reading {path.name}", unit="struct", leave=False,
                  disable=not self.progress or len(frames) < 1000)
        for k, atoms in zip(numbers, it):
            data_list.append(atoms_to_data(atoms, k, source, self.dtype, energy_key, forces_key, stress_key))
        meta = {"num_frames": len(data_list)}
        # forces: all frames or none
        with_forces = [("forces" in d) for d in data_list]
        if any(with_forces) and not all(with_forces):
            k = with_forces.index(False)
            raise KeyError(
                f"{source}: frame {numbers[k]}: no forces under key {forces_key!r} although other frames have them; "
                f"available: {available_keys(frames[k], forces_key)}"
            )
        meta["has_forces"] = bool(all(with_forces))
        meta["per_atom_keys"] = sorted(k for k in frames[0].arrays if k not in ("numbers", "positions"))
        meta["calc_keys"] = sorted((getattr(frames[0].calc, "results", {}) or {}) if frames[0].calc is not None else {})
        with_stress = [("stress" in d) for d in data_list]
        if any(with_stress) and not all(with_stress):
            k = with_stress.index(False)
            raise KeyError(
                f"{source}: frame {numbers[k]}: no stress under key {stress_key!r} although other frames have one; "
                "give every frame a stress or set stress_key=None"
            )
        meta["has_stress"] = bool(all(with_stress))
        meta["config_types"] = []
        if self.config_type_key and any(self.config_type_key in atoms.info for atoms in frames):
            values = [str(atoms.info.get(self.config_type_key, DEFAULT_CONFIG_TYPE)) for atoms in frames]
            names = list(dict.fromkeys(values))
            for d, value in zip(data_list, values):
                d.config_type = torch.tensor([names.index(value)], dtype=torch.long)
            meta["config_types"] = names
        harmonize_cells(data_list)
        attach_edges(data_list, self.cutoff, desc=f"graphs {path.name}", progress=self.progress, source=source)
        return StructureDataset.from_data_list(data_list, source, key, meta).to_state()

    def _dataset(self, path: Path, energy_key: Optional[str] = None, forces_key: Optional[str] = "",
                 stress_key: Optional[str] = "", format: Optional[str] = "",
                 select: Optional[Mapping[str, Any]] = None) -> StructureDataset:
        """The processed frames of ``path`` (matching ``select``), read with the given keys (default: the module's)."""
        energy_key = self.energy_key if energy_key is None else energy_key
        forces_key = self.forces_key if forces_key == "" else forces_key
        stress_key = self.stress_key if stress_key == "" else stress_key
        format = self.format if format == "" else format
        select = None if not select else {str(k): v for k, v in select.items()}
        path = path.expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"structure file not found: {path}{data_root_hint(path)}")
        key = _cache.make_key(
            "xyz", _cache.file_fingerprint(path), self.cutoff, energy_key, forces_key,
            stress_key, dtype_name(self.dtype), format, self.config_type_key, select,
        )
        state = _cache.cached(path, path.stem, key, lambda: self._process_file(
            path, key, energy_key, forces_key, stress_key, format, select), self.cache)
        return StructureDataset.from_state(state)

    @property
    def test_config_types(self) -> Dict[str, List[str]]:
        """``{test set: config type names}`` (indexed by the structures' ``config_type``) for the test
        sets whose structures have at least two config types; their metrics are also reported per type."""
        out = {}
        for name, ds in self.test_datasets.items():
            names = ds.meta.get("config_types") or []
            if len(names) > 1 and ds.has("config_type"):
                present = torch.unique(ds._data.config_type.view(-1)[ds.base_indices()])
                if present.numel() > 1:
                    out[name] = list(names)
        return out

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

        tests = self._test_sets({"test": subset(full, test_idx)} if n_test else {})
        return train, val, tests

    def _test_sets(self, tests: Dict[str, StructureDataset]) -> Dict[str, StructureDataset]:
        """``tests`` plus the sets of ``test_files``, each capped at ``num_test`` structures."""
        tests = dict(tests)
        for name, spec in self.test_files.items():
            if name in tests:
                raise ValueError(f"test set name {name!r} is used twice (random test split and test_files)")
            tests[name] = self._dataset(spec["path"], spec["energy_key"], spec["forces_key"], spec["stress_key"],
                                        spec["format"], spec["select"])
        return {name: random_subset(ds, self.num_test, self.seed) for name, ds in tests.items()}

    def setup(self, stage: Optional[str] = None) -> None:
        """Without ``train_file``: only the test sets, for ``stage`` ``"test"``/``"predict"`` (evaluation)."""
        if self.train_file is not None:
            return super().setup(stage)
        if stage not in ("test", "predict"):
            raise ValueError("data.train_file is not set: training needs a training file (a test-only data "
                             "module is for evaluating a checkpoint: setup('test'))")
        if self._is_setup:
            return
        if not self.test_files:
            raise ValueError("neither data.train_file nor data.test_files is set: nothing to evaluate")
        self.test_datasets = self._test_sets({})
        self._is_setup = True
