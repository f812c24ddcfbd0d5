"""Common Lightning data module for interatomic-potential datasets."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import lightning as L
import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols
from torch_geometric.loader import DataLoader

from pyg_equireann.nn.elements import MAX_Z
from pyg_equireann.training.statistics import UnitIssue, check_energy_units, compute_statistics, frame_pair_work
from pyg_equireann.utils import source_checkout

from . import cache as _cache
from pyg_equireann.datamodules.structures import StructureDataset, element_name, lookup
from pyg_equireann.utils import dtype_name, resolve_dtype

#: Environment variable naming the data folder (:func:`default_data_root`).
DATA_ENV = "PYG_EQUIREANN_DATA"


def default_data_root() -> Path:
    """The data folder of the dataset configs and presets: ``$PYG_EQUIREANN_DATA`` if set, else the
    checkout's ``data/`` when running from a source checkout, else ``./data`` in the working directory.
    Read at each call (``${data_root:}`` in ``conf/data/*.yaml``)."""
    return _data_root()[0]


def _data_root() -> Tuple[Path, str]:
    """(data folder, where it comes from)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    checkout = source_checkout()
    if checkout is not None and (checkout / "data").is_dir():
        return checkout / "data", "the source checkout's data/"
    return Path.cwd() / "data", "./data in the working directory"


def data_root_hint(path: str | os.PathLike) -> str:
    """For a missing ``path`` inside the default data folder: which folder that is and how to choose another
    (to end an error message), else ``""``."""
    root, source = _data_root()
    if not Path(path).expanduser().resolve().is_relative_to(root.expanduser().resolve()):
        return ""
    return f" (data folder {root}: {source}; set {DATA_ENV}=<folder> for another)"


AtomicEnergiesSpec = Union[None, str, os.PathLike, Mapping[Any, float]]


def read_isolated_atoms(path: str | os.PathLike, energy_key: str = "energy") -> Dict[int, float]:
    """{Z: eV} from the single-atom frames of an ASE-readable file (e.g. ``isolated_atoms.xyz``)."""
    import ase.io

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"isolated-atom energy file not found: {path}")
    try:
        frames = ase.io.read(str(path), index=":")
    except Exception as exc:
        raise ValueError(f"{path}: cannot read isolated-atom energies: {exc}") from exc
    e0: Dict[int, float] = {}
    for k, atoms in enumerate(frames):
        if len(atoms) != 1:
            continue
        energy = lookup(atoms, energy_key, per_atom=False)
        if energy is None:
            energy = lookup(atoms, "energy", per_atom=False)
        if energy is None:
            raise KeyError(f"{path}: frame {k}: single-atom frame has no energy under key {energy_key!r}")
        z = int(atoms.numbers[0])
        e0.setdefault(z, float(energy))
    if not e0:
        raise ValueError(f"{path}: no single-atom frames with energies found")
    return e0


def normalize_atomic_energies(spec: Mapping[Any, float]) -> Dict[int, float]:
    """{Z or symbol or 'Z' string: eV} -> {Z: eV}."""
    out: Dict[int, float] = {}
    for key, value in dict(spec).items():
        if isinstance(key, str) and not key.strip().lstrip("-").isdigit():
            if key not in atomic_numbers:
                raise ValueError(f"atomic_energies: unknown element symbol {key!r}")
            z = atomic_numbers[key]
        else:
            z = int(key)
        out[z] = float(value)
    return out


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Random order drawn from (seed, epoch) alone. Lightning calls :meth:`set_epoch` before every
    epoch, so a run resumed from a checkpoint sees exactly the batches of an uninterrupted run."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class PotentialDataModule(L.LightningDataModule):
    """Base class: splits, statistics, element checks and data loaders.

    Subclasses implement :meth:`_load` returning ``(train, val, {name: test})`` datasets of
    :class:`~pyg_equireann.datamodules.structures.StructureDataset` (subsets allowed). After :meth:`setup`:
    ``train_dataset``, ``val_dataset``, ``test_datasets`` (dict), ``test_names``, ``elements``
    (sorted Z of the training set) and ``statistics`` (:func:`pyg_equireann.compute_statistics`
    on the training set only; cached on disk).

    Args:
        cutoff: neighbour-list cutoff (Å) used for ``edge_index`` and ``avg_num_neighbors``.
        batch_size: training batch size (structures); ``eval_batch_size`` for validation/test.
        num_workers: DataLoader workers.
        seed: seed of the random splits and of the training-loader shuffling.
        dtype: ``"float32"`` or ``"float64"`` for positions, forces, cells, stress (energies are float64).
        cache: cache processed graphs and statistics on disk (next to the data).
        atomic_energies: isolated-atom energies: ``None``/``"fit"`` (least squares on the training
            set), a path to a file of single-atom frames, or a dict ``{Z or symbol: eV}``.
        progress: show progress bars when processing long files.
        check_units: ``True`` (default): energies and forces in inconsistent units stop :meth:`setup`
            with a ValueError when the evidence is unambiguous and warn otherwise; ``"warn"``: always
            warn; ``False``: no unit check (:func:`pyg_equireann.training.statistics.check_energy_units`).
    """

    energy_key: str = "energy"

    def __init__(
        self,
        cutoff: float = 4.0,
        batch_size: int = 10,
        eval_batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        dtype: str = "float32",
        cache: bool = True,
        atomic_energies: AtomicEnergiesSpec = None,
        progress: bool = True,
        pin_memory: bool = False,
        check_units: Union[bool, str] = True,
    ) -> None:
        super().__init__()
        cutoff = float(cutoff)
        if not np.isfinite(cutoff) or cutoff <= 0:
            raise ValueError(f"cutoff must be a positive number (Å), got {cutoff}")
        if int(batch_size) < 1 or int(eval_batch_size) < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        self.cutoff = cutoff
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.dtype = resolve_dtype(dtype)
        self.cache = bool(cache)
        self.atomic_energies_spec = atomic_energies
        self.progress = bool(progress)
        self.pin_memory = bool(pin_memory)
        self.check_units = _check_units_mode(check_units)

        self.train_dataset: Optional[StructureDataset] = None
        self.val_dataset: Optional[StructureDataset] = None
        self.test_datasets: Dict[str, StructureDataset] = {}
        self.statistics: Optional[Dict[str, Any]] = None
        self.elements: List[int] = []
        self._is_setup = False

    # ------------------------------------------------------------------ to implement
    def _load(self) -> Tuple[StructureDataset, StructureDataset, Dict[str, StructureDataset]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    @property
    def test_names(self) -> List[str]:
        return list(self.test_datasets)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._is_setup:
            return
        train, val, tests = self._load()
        if len(train) == 0:
            raise ValueError(f"{train.source}: the training set is empty")
        elements = train.elements()
        self._check_elements(elements, train, "validation set", val)
        for name, ds in tests.items():
            self._check_elements(elements, train, f"test set {name!r}", ds)
        atomic_energies = self._resolve_atomic_energies(elements, train)
        self.statistics = self._training_statistics(train, atomic_energies)
        if self.check_units:
            for issue in self._unit_warnings(train, atomic_energies is not None):
                if issue.error and self.check_units == "error":
                    raise ValueError(f"{issue.message}; or set check_units=warn (data.check_units=warn) to train anyway")
                warnings.warn(issue.message, UserWarning, stacklevel=2)
        self.train_dataset, self.val_dataset, self.test_datasets = train, val, dict(tests)
        self.elements = elements
        self._is_setup = True

    @staticmethod
    def _check_elements(elements: List[int], train: StructureDataset, what: str, ds: Optional[StructureDataset]) -> None:
        if ds is None or len(ds) == 0:
            return
        missing = [z for z in ds.elements() if z not in elements]
        if missing:
            z = missing[0]
            names = ", ".join(element_name(m) for m in missing)
            raise ValueError(
                f"{what} ({ds.source}) contains element {names} not present in the training set "
                f"({train.source}; elements {[chemical_symbols[e] for e in elements]}); first in frame "
                f"{ds.first_frame_with(z)} of {ds.source}. The model cannot predict unseen elements: "
                f"add structures with {chemical_symbols[z]} to the training data or remove them from the {what}"
            )

    def _resolve_atomic_energies(self, elements: List[int], train: StructureDataset) -> Optional[Dict[int, float]]:
        spec = self.atomic_energies_spec
        if spec is None or (isinstance(spec, str) and spec.lower() in ("fit", "lstsq", "least_squares", "none")):
            return None
        if isinstance(spec, (str, os.PathLike)):
            e0 = read_isolated_atoms(spec, self.energy_key)
            origin = f"isolated-atom file {spec}"
        elif isinstance(spec, Mapping):
            e0 = normalize_atomic_energies(spec)
            origin = "the atomic_energies dict"
        else:
            raise ValueError(f"atomic_energies must be None, 'fit', a file path or a dict {{Z: eV}}, got {spec!r}")
        missing = [z for z in elements if z not in e0]
        if missing:
            raise KeyError(
                f"{origin} has no isolated-atom energy for {', '.join(element_name(z) for z in missing)}, "
                f"which occurs in the training set ({train.source})"
            )
        return e0

    def _training_statistics(self, train: StructureDataset, atomic_energies: Optional[Dict[int, float]]) -> Dict[str, Any]:
        indices = train.base_indices().numpy().astype(np.int64)
        e0_items = None if atomic_energies is None else sorted(atomic_energies.items())
        key = _cache.make_key(
            "statistics", train.key, self.cutoff, _cache.make_key(indices.tobytes().hex()), e0_items
        )

        def compute() -> Dict[str, Any]:
            return compute_statistics(train, self.cutoff, "energy", "forces", atomic_energies, precomputed_edges=True)

        return _cache.cached(train.source, "statistics", key, compute, self.cache)

    def _unit_warnings(self, train: StructureDataset, atomic_energies_given: bool) -> List[UnitIssue]:
        """:func:`~pyg_equireann.training.statistics.check_energy_units` on the training set (from the collated storage),
        with :func:`~pyg_equireann.training.statistics.frame_pair_work` between its frames when it has forces."""
        data, base = train._data, train.base_indices()
        graph = train.atom_graph()
        counts = torch.zeros(train.slices["z"].numel() - 1, MAX_Z + 1, dtype=torch.float64)
        counts.index_put_((graph, data.z.long()), torch.ones(graph.numel(), dtype=torch.float64), accumulate=True)
        energies = data.energy.view(-1)[base]
        forces_rms, pairs = None, None
        if train.has("forces"):
            forces_rms = float(self.statistics["scale"])
            numbers, positions, forces, cells = self._pair_frames(train)
            pairs = frame_pair_work(numbers, positions, forces, energies, cells)
        return check_energy_units(energies, counts[base], self.statistics["atomic_energies"], forces_rms,
                                  atomic_energies_given, train.source, train.frame_indices().tolist(), pairs)

    @staticmethod
    def _pair_frames(train: StructureDataset):
        """Per-frame atomic numbers, positions, forces and cells (None: molecule) of ``train`` for
        :func:`~pyg_equireann.training.statistics.frame_pair_work`; partly periodic frames get a cell-less marker
        of their own so that they are never paired."""
        data, slices = train._data, train.slices
        numbers, positions, forces, cells = [], [], [], []
        periodic = "cell" in slices and "pbc" in slices
        for b in train.base_indices().tolist():
            a0, a1 = int(slices["z"][b]), int(slices["z"][b + 1])
            z = data.z[a0:a1]
            cell = None
            if periodic:
                pbc = data.pbc[int(slices["pbc"][b])]
                if bool(pbc.all()):
                    cell = data.cell[int(slices["cell"][b])].reshape(3, 3)
                elif bool(pbc.any()):
                    z = torch.cat([z, torch.tensor([-1 - b])])  # unique composition: no partner
            numbers.append(z)
            positions.append(data.pos[a0:a1])
            forces.append(data.forces[a0:a1])
            cells.append(cell)
        return numbers, positions, forces, cells

    # ------------------------------------------------------------------ loaders
    def _require_setup(self) -> None:
        if not self._is_setup:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before requesting data loaders")

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> List[DataLoader]:
        self._require_setup()
        return [self._loader(ds, self.eval_batch_size, shuffle=False) for ds in self.test_datasets.values()]

    def calibration_batch(self, max_structures: int = 100):
        """The first ``max_structures`` training structures as one batch (deterministic, no RNG used),
        e.g. for :meth:`pyg_equireann.EquiREANN.calibrate_density_scale`."""
        from torch_geometric.data import Batch

        self._require_setup()
        n = min(max_structures, len(self.train_dataset))
        return Batch.from_data_list([self.train_dataset[i] for i in range(n)])

    # ------------------------------------------------------------------ info
    def summary(self) -> str:
        """One line per split: structures, source; plus statistics."""
        self._require_setup()
        lines = [f"{type(self).__name__}: cutoff {self.cutoff} Å, dtype {dtype_name(self.dtype)}, "
                 f"elements {[chemical_symbols[z] for z in self.elements]}"]
        lines.append(f"  train {len(self.train_dataset)} from {self.train_dataset.source}")
        lines.append(f"  val   {len(self.val_dataset)} from {self.val_dataset.source}")
        for name, ds in self.test_datasets.items():
            lines.append(f"  test {name!r} {len(ds)} from {ds.source}")
        s = self.statistics
        lines.append(
            f"  E0 {s['atomic_energies']} eV, shift {s['shift']:.6g} eV/atom, scale {s['scale']:.6g} eV/Å, "
            f"avg_num_neighbors {s['avg_num_neighbors']:.4g}"
        )
        return "\n".join(lines)


def _check_units_mode(value: Union[bool, str]) -> Union[bool, str]:
    """``check_units`` argument -> ``"error"``, ``"warn"`` or False."""
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "error"):
        return "error"
    if text in ("warn", "warning"):
        return "warn"
    if text in ("false", "0", "no", "off", "none"):
        return False
    raise ValueError(f"check_units must be true, false or warn, got {value!r}")


def subset(dataset: StructureDataset, indices) -> StructureDataset:
    """Subset sharing storage; ``indices`` relative to ``dataset`` (sorted for reproducible order)."""
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    return dataset[torch.as_tensor(idx, dtype=torch.long)]


def random_subset(dataset: StructureDataset, n: Optional[int], seed: int) -> StructureDataset:
    """At most ``n`` structures drawn with ``seed`` (all when ``n`` is None or >= len)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 0:
        raise ValueError(f"number of structures must be >= 0, got {n}")
    pick = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return subset(dataset, pick)
