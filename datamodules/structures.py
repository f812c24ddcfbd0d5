"""Structures as PyG ``Data`` objects: construction, validation, neighbour lists, storage.

Every structure is a :class:`torch_geometric.data.Data` with

* ``z`` (N,) long, ``pos`` (N, 3) Å in the module dtype, ``energy`` (1,) float64 eV,
* ``forces`` (N, 3) eV/Å and ``stress`` (1, 3, 3) eV/Å³ (ASE sign convention) when present,
* ``cell`` (1, 3, 3) Å and ``pbc`` (1, 3) bool for periodic structures (omitted for molecules),
* ``edge_index`` (2, E) long from :func:`pyg_equireann.graph.neighbors.build_graph` (row 0 neighbour j,
  row 1 centre i) and ``cell_offsets`` (E, 3) for periodic structures,
* ``idx`` (1,) long: the frame index in its source file.

If a file mixes periodic and non-periodic structures, its molecules get a zero cell, ``pbc``
False and zero ``cell_offsets`` so that all graphs of the file have the same fields (needed to
batch them); ``build_graph`` treats them as non-periodic.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import Tensor
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.data.collate import collate
from tqdm.auto import tqdm

from pyg_equireann.graph.edges import edge_vectors, image_shifts
from pyg_equireann.graph.neighbors import build_graph
from pyg_equireann.utils import plain
from pyg_equireann.graph.checks import MIN_DISTANCE

#: Molecules per batched neighbour-list call while processing.
GRAPH_CHUNK = 512
#: Show progress bars for files with at least this many structures.
PROGRESS_MIN_FRAMES = 1000


def element_name(z: int) -> str:
    return f"{chemical_symbols[z]} (Z={z})" if 0 < z < len(chemical_symbols) else f"Z={z}"


# --------------------------------------------------------------------------- hyperparameters


def plain_hparams(module) -> None:
    """Replace the saved hyperparameters of a Lightning module or data module by
    :func:`~pyg_equireann.utils.plain` values (call right after ``save_hyperparameters()``)."""
    for key in list(module.hparams):
        module.hparams[key] = plain(module.hparams[key])


# --------------------------------------------------------------------------- validation


def check_finite(
    values: np.ndarray, what: str, source: str, frames: Optional[Sequence[int]] = None, per_atom: bool = False
) -> None:
    """Raise ValueError naming source, frame, key (``what``) and atom if ``values`` has NaN/inf.

    ``values`` has a leading frame axis (then an atom axis if ``per_atom``); ``frames`` maps
    positions along it to frame numbers in the source file (default: identity).
    """
    values = np.asarray(values)
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = np.argwhere(~finite)[0]
    frame = int(frames[bad[0]]) if frames is not None else int(bad[0])
    msg = f"{source}: frame {frame}: {what}"
    if per_atom and len(bad) > 1:
        msg += f" of atom {int(bad[1])}"
    raise ValueError(f"{msg} contains a non-finite value (NaN or inf)")


# --------------------------------------------------------------------------- Data objects


def make_data(
    z: np.ndarray,
    pos: np.ndarray,
    energy: float,
    idx: int,
    dtype: torch.dtype,
    forces: Optional[np.ndarray] = None,
    stress: Optional[np.ndarray] = None,
    cell: Optional[np.ndarray] = None,
    pbc: Optional[np.ndarray] = None,
) -> Data:
    """One structure (no edges yet). Arrays in Å / eV / eV/Å / eV/Å³."""
    data = Data(
        z=torch.as_tensor(np.asarray(z), dtype=torch.long).reshape(-1),
        pos=torch.as_tensor(np.asarray(pos, dtype=np.float64)).to(dtype).reshape(-1, 3),
        energy=torch.tensor([float(energy)], dtype=torch.float64),
        idx=torch.tensor([int(idx)], dtype=torch.long),
    )
    if forces is not None:
        data.forces = torch.as_tensor(np.asarray(forces, dtype=np.float64)).to(dtype).reshape(-1, 3)
    if stress is not None:
        data.stress = torch.as_tensor(np.asarray(stress, dtype=np.float64)).to(dtype).reshape(1, 3, 3)
    if cell is not None:
        data.cell = torch.as_tensor(np.asarray(cell, dtype=np.float64)).to(dtype).reshape(1, 3, 3)
        data.pbc = torch.as_tensor(np.asarray(pbc, dtype=bool)).reshape(1, 3)
    return data


def _is_periodic(data: Data) -> bool:
    return "cell" in data and "pbc" in data and bool(data.pbc.any())


def harmonize_cells(data_list: Sequence[Data]) -> None:
    """If some structures are periodic, give the others a zero cell and ``pbc`` False (in place)."""
    if not any("cell" in d for d in data_list):
        return
    for d in data_list:
        if "cell" not in d:
            d.cell = torch.zeros((1, 3, 3), dtype=d.pos.dtype)
            d.pbc = torch.zeros((1, 3), dtype=torch.bool)


def _check_overlaps(chunk: Sequence[Data], edge_index: Tensor, lengths: Tensor, graph: Tensor, source: str) -> None:
    """ValueError naming file, frame and atoms if an edge (local atom indices) is shorter than MIN_DISTANCE."""
    bad = lengths < MIN_DISTANCE
    if not bool(bad.any()):
        return
    e = int(bad.nonzero()[0, 0])
    d = chunk[int(graph[e])]
    j, i = int(edge_index[0, e]), int(edge_index[1, e])
    other = f"atom {j}" if "cell_offsets" not in d or not bool(d.cell_offsets[e].abs().sum() > 0) else \
        f"a periodic image of {'itself' if i == j else f'atom {j}'}"
    raise ValueError(
        f"{source}: frame {int(d.idx)}: atom {i} ({chemical_symbols[int(d.z[i])]}) and {other} are "
        f"{float(lengths[e]):.3g} Å apart (closer than {MIN_DISTANCE} Å): duplicated or overlapping atoms"
    )


def attach_edges(data_list: Sequence[Data], cutoff: float, desc: str = "graphs", progress: bool = True,
                 source: str = "") -> None:
    """Set ``edge_index`` (and ``cell_offsets`` where a cell is stored) on every structure, in place.

    The result equals ``build_graph(d.pos, cutoff, None, d.cell, d.pbc)`` per structure; molecules
    are processed in batches (one neighbour-list call per :data:`GRAPH_CHUNK` structures) because
    that is several times faster. Atoms closer than
    :data:`~pyg_equireann.graph.checks.MIN_DISTANCE` raise a ValueError naming ``source``, frame and atoms.
    """
    n = len(data_list)
    bar = tqdm(total=n, desc=desc, unit="struct", disable=not progress or n < PROGRESS_MIN_FRAMES, leave=False)
    molecules = [k for k, d in enumerate(data_list) if not _is_periodic(d)]
    periodic = [k for k, d in enumerate(data_list) if _is_periodic(d)]
    for start in range(0, len(molecules), GRAPH_CHUNK):
        chunk = [data_list[k] for k in molecules[start : start + GRAPH_CHUNK]]
        counts = torch.tensor([d.pos.shape[0] for d in chunk], dtype=torch.long)
        ptr = torch.zeros(len(chunk) + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=ptr[1:])
        pos = torch.cat([d.pos for d in chunk])
        batch = torch.repeat_interleave(torch.arange(len(chunk)), counts)
        edge_index, _ = build_graph(pos, cutoff, batch, None, None)
        lengths = torch.linalg.vector_norm(edge_vectors(pos, edge_index), dim=1)
        _check_overlaps(chunk, edge_index - ptr[batch[edge_index[1]]], lengths, batch[edge_index[1]], source)
        # edges are sorted by centre (row 1), hence by graph
        bounds = torch.searchsorted(edge_index[1].contiguous(), ptr).tolist()
        for g, d in enumerate(chunk):
            d.edge_index = (edge_index[:, bounds[g] : bounds[g + 1]] - ptr[g]).clone()
            if "cell" in d:
                d.cell_offsets = torch.zeros((d.edge_index.shape[1], 3), dtype=d.pos.dtype)
        bar.update(len(chunk))
    for k in periodic:
        d = data_list[k]
        edge_index, offsets = build_graph(d.pos, cutoff, None, d.cell, d.pbc)
        d.edge_index = edge_index
        d.cell_offsets = offsets
        shift = image_shifts(edge_index, offsets.to(d.pos.dtype), d.cell[0])
        lengths = torch.linalg.vector_norm(edge_vectors(d.pos, edge_index, shift), dim=1)
        _check_overlaps([d], edge_index, lengths, torch.zeros_like(lengths, dtype=torch.long), source)
        bar.update(1)
    bar.close()


# --------------------------------------------------------------------------- dataset


class StructureDataset(InMemoryDataset):
    """In-memory dataset of processed structures (PyG's collated storage).

    ``source``: the file the structures come from; ``key``: hash identifying the processed
    content (file + cutoff + keys + dtype); ``meta``: plain dict (e.g. ``has_forces``).
    Subsets made with ``dataset[indices]`` share the storage and keep these attributes.
    """

    def __init__(self, data: Data, slices: Optional[Dict[str, Tensor]], source: str = "", key: str = "", meta: Optional[dict] = None):
        super().__init__(None, log=False)
        self._data = data
        self.slices = slices
        self.source = str(source)
        self.key = key
        self.meta = dict(meta or {})

    @classmethod
    def from_data_list(cls, data_list: Sequence[Data], source: str = "", key: str = "", meta: Optional[dict] = None):
        if len(data_list) == 0:
            raise ValueError(f"{source}: no structures")
        data, slices, _ = collate(Data, data_list=list(data_list), increment=False, add_batch=False)
        return cls(data, slices, source, key, meta)

    def to_state(self) -> dict:
        """Plain tensors/dicts for ``torch.save`` (loadable with ``weights_only=True``)."""
        return {
            "data": {k: v for k, v in self._data.to_dict().items()},
            "slices": dict(self.slices),
            "source": self.source,
            "key": self.key,
            "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: dict) -> "StructureDataset":
        return cls(Data.from_dict(state["data"]), state["slices"], state["source"], state["key"], state["meta"])

    # helpers working on the collated storage (fast, no per-structure Data objects)
    def base_indices(self) -> Tensor:
        """Indices of this (sub)set's structures in the full stored dataset."""
        return torch.as_tensor(list(self.indices()), dtype=torch.long)

    def frame_indices(self) -> Tensor:
        """Source-file frame index (``idx``) of each structure of this (sub)set."""
        return self._data.idx[self.base_indices()]

    def atom_graph(self) -> Tensor:
        """(total atoms,) index of the stored structure each stored atom belongs to."""
        counts = self.slices["z"].diff()
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    def elements(self) -> List[int]:
        """Sorted atomic numbers present in this (sub)set."""
        if self._indices is None:
            z = self._data.z
        else:
            mask = torch.zeros(self.slices["z"].numel() - 1, dtype=torch.bool)
            mask[self.base_indices()] = True
            z = self._data.z[mask[self.atom_graph()]]
        return sorted(int(v) for v in torch.unique(z))

    def first_frame_with(self, element: int) -> int:
        """Source frame index of the first structure of this (sub)set that contains ``element``."""
        graphs = set(self.atom_graph()[self._data.z == element].tolist())
        for b in self.base_indices().tolist():
            if b in graphs:
                return int(self._data.idx[b])
        return -1

    def has(self, key: str) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, source={os.path.basename(self.source)!r})"


# --------------------------------------------------------------------------- ASE Atoms


def available_keys(atoms, key: Optional[str] = None) -> str:
    """The keys stored in ``atoms`` (and the closest one to a misspelt ``key``) for error messages."""
    import difflib

    info = sorted(atoms.info)
    arrays = sorted(k for k in atoms.arrays if k not in ("numbers", "positions"))
    results = sorted(getattr(atoms.calc, "results", {}) or {}) if atoms.calc is not None else []
    text = f"info keys {info}, per-atom arrays {arrays}, calculator results {results}"
    keys = info + arrays + results
    lower = {k.lower(): k for k in reversed(keys)}  # case-insensitive: E_DFT finds E_dft
    close = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6) if key else []
    return text + (f". Did you mean {lower[close[0]]!r}?" if close else "")


def lookup(atoms, key: str, per_atom: bool) -> Any:
    """Value stored under ``key`` in ``atoms.info`` (or ``atoms.arrays`` if ``per_atom``) or in the
    calculator results (ASE >= 3.23 moves ``energy``/``forces``/``stress`` there); None if absent."""
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    calc = atoms.calc
    results = getattr(calc, "results", None) if calc is not None else None
    if results and key in results and results[key] is not None:
        return results[key]
    return None


def stress_3x3(value, source: str, frame: int, key: str) -> np.ndarray:
    s = np.asarray(value, dtype=np.float64)
    if s.size == 6:  # Voigt order xx yy zz yz xz xy (ASE)
        xx, yy, zz, yz, xz, xy = s.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if s.size == 9:
        return s.reshape(3, 3)
    raise ValueError(f"{source}: frame {frame}: stress key {key!r} has {s.size} values; expected 6 (Voigt) or 9 (3x3)")


def atoms_to_data(
    atoms,
    frame: int,
    source: str,
    dtype: torch.dtype,
    energy_key: str,
    forces_key: Optional[str],
    stress_key: Optional[str],
) -> Data:
    """Validated :class:`Data` (without edges) from one ASE Atoms frame; errors name file/frame/key/atom."""
    n = len(atoms)
    if n == 0:
        raise ValueError(f"{source}: frame {frame} has no atoms")
    fidx = [frame]
    z = atoms.numbers
    bad = np.flatnonzero((z < 1) | (z >= len(chemical_symbols)))
    if bad.size:
        raise ValueError(f"{source}: frame {frame}: atom {int(bad[0])} has invalid atomic number {int(z[bad[0]])}")
    pos = atoms.positions
    check_finite(pos[None], "positions", source, fidx, per_atom=True)

    energy = lookup(atoms, energy_key, per_atom=False)
    if energy is None:
        raise KeyError(
            f"{source}: frame {frame}: no energy under key {energy_key!r}; available: {available_keys(atoms, energy_key)}"
        )
    try:
        energy = float(np.asarray(energy, dtype=np.float64).reshape(()))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: frame {frame}: energy key {energy_key!r} is not a number: {energy!r}") from exc
    if not np.isfinite(energy):
        raise ValueError(f"{source}: frame {frame}: energy key {energy_key!r} contains a non-finite value (NaN or inf): {energy}")

    forces = None
    if forces_key is not None:
        forces = lookup(atoms, forces_key, per_atom=True)
        if forces is not None:
            forces = np.asarray(forces, dtype=np.float64)
            if forces.shape != (n, 3):
                raise ValueError(
                    f"{source}: frame {frame}: forces key {forces_key!r} has shape {forces.shape}; expected ({n}, 3) for {n} atoms"
                )
            check_finite(forces[None], f"forces key {forces_key!r}", source, fidx, per_atom=True)

    stress = None
    if stress_key is not None:
        value = lookup(atoms, stress_key, per_atom=False)
        if value is not None:
            stress = stress_3x3(value, source, frame, stress_key)
            check_finite(stress[None], f"stress key {stress_key!r}", source, fidx)

    cell = pbc = None
    if atoms.pbc.any():
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        check_finite(cell[None], "cell", source, fidx)
        for d in range(3):
            if pbc[d] and not np.linalg.norm(cell[d]) > 0:
                raise ValueError(f"{source}: frame {frame}: periodic direction {d} has a zero lattice vector (cell {cell.tolist()})")
    return make_data(z, pos, energy, frame, dtype, forces, stress, cell, pbc)
