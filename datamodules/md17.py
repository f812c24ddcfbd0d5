"""MD17 data module: revised (rMD17), original (MD17) and CCSD(T) trajectories.

File names and npz keys follow :class:`torch_geometric.datasets.MD17`:

* revised: ``rmd17_<mol>.npz`` with keys ``nuclear_charges``, ``coords``, ``energies``, ``forces``
  (kcal/mol, kcal/mol/Å), plus the official splits ``splits/index_{train,test}_0N.csv``. Looked up
  (in this order) as

  - ``<root>/rmd17/rmd17_<mol>_{train,test}_0N.npz`` (one split per file, same keys; shipped layout),
  - ``<root>/rmd17/npz_data/rmd17_<mol>.npz`` + ``<root>/rmd17/splits/index_{train,test}_0N.csv``
    (official archive ``rmd17.tar.bz2`` extracted into ``root``),
  - ``<root>/raw/rmd17/npz_data/...`` + ``<root>/raw/rmd17/splits/...`` (PyG's layout).

* original: ``md17_<mol>.npz`` (keys ``z``, ``R``, ``E``, ``F``; kcal/mol) in ``<root>/md17/`` or
  PyG's ``<root>/<mol>/raw/``. No official split: ``split`` seeds a random train pool/test draw.
* ccsd: ``<mol>_ccsd_t-{train,test}.npz`` (aspirin: ``aspirin_ccsd-...``; keys as original) in
  ``<root>/md17_ccsd/`` or PyG's ``<root>/<mol> CCSD(T)/raw/``.

Missing files are downloaded only when ``download`` allows it and the server is reachable;
otherwise a FileNotFoundError says which file to put in which folder and where to get it.
Energies and forces are converted once, explicitly, from kcal/mol to eV (:data:`KCAL_PER_MOL`).
"""
from __future__ import annotations

import os
import socket
import urllib.parse
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from ase import units
from torch_geometric.datasets.md17 import MD17 as _PyGMD17

from pyg_equireann.nn.elements import MAX_Z

from . import cache as _cache
from pyg_equireann.datamodules.base import (AtomicEnergiesSpec, PotentialDataModule, data_root_hint, default_data_root,
                                            random_subset, subset)
from pyg_equireann.datamodules.structures import StructureDataset, attach_edges, check_finite, make_data
from pyg_equireann.utils import dtype_name

#: 1 kcal/mol in eV (= 0.0433641...). The only unit conversion of MD17 data.
KCAL_PER_MOL: float = units.kcal / units.mol

GDML_URL = _PyGMD17.gdml_url
REVISED_URL = _PyGMD17.revised_url
RMD17_FIGSHARE = "https://figshare.com/articles/dataset/Revised_MD17_dataset_rMD17_/12672038"
VARIANTS = {
    "revised": "revised", "rmd17": "revised",
    "original": "original", "md17": "original",
    "ccsd": "ccsd", "ccsd(t)": "ccsd", "ccsd_t": "ccsd",
}
_KEYS = {
    "revised": ("nuclear_charges", "coords", "energies", "forces"),
    "original": ("z", "R", "E", "F"),
    "ccsd": ("z", "R", "E", "F"),
}
#: Frames in each official rMD17 split file.
SPLIT_SIZE = 1000


#: numpy dtype kinds that are no numbers, for the messages
_KIND = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers", "M": "dates", "m": "time spans",
         "V": "raw records"}


def read_npz(path: Path, keys: Tuple[str, ...]) -> Dict[str, np.ndarray]:
    """The numeric arrays ``keys`` of an npz archive, read without unpickling. Anything else (empty,
    truncated or corrupt file, an .npy array, missing keys, object or text arrays) raises a one-line
    ValueError/KeyError naming the file."""
    source = str(path)
    size = path.stat().st_size if path.is_file() else 0
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = "the file is empty" if size == 0 else "it is truncated or corrupt, or not an npz archive"
        raise ValueError(f"{source}: cannot read it as an npz archive ({size} bytes): {reason}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{source}: holds a single array (.npy format), not an npz archive with the keys {list(keys)}")
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise KeyError(f"{source}: missing keys {missing}; available keys {sorted(archive.files)}")
        arrays = {}
        for k in keys:
            try:
                value = archive[k]
            except ValueError as exc:
                if "allow_pickle" not in str(exc):
                    raise ValueError(f"{source}: key {k!r} cannot be read: the file is truncated or corrupt ({exc})") from exc
                # numpy's hint (allow_pickle=True) would let the file run code: not taken
                raise ValueError(f"{source}: key {k!r} holds Python objects (a pickled object array), not numbers; "
                                 "it is not unpickled because that can run code. Save it as a numeric array") from exc
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(f"{source}: key {k!r} cannot be read: the file is truncated or corrupt ({exc})") from exc
            if value.dtype.kind not in "biuf":
                raise ValueError(f"{source}: key {k!r} holds {_KIND.get(value.dtype.kind, value.dtype.kind)} "
                                 f"(dtype {value.dtype}), not numbers")
            arrays[k] = value
    return arrays


def atomic_numbers_of(values: np.ndarray, source: str, key: str) -> np.ndarray:
    """(N,) int64 atomic numbers from an array, or a ValueError naming the file and the first bad atom."""
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        raise ValueError(f"{source}: key {key!r} is empty (no atoms)")
    z = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)
    bad = np.flatnonzero((z != values) | (z < 1) | (z > MAX_Z))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{source}: key {key!r}: atom {i} has atomic number {values[i]}; expected an integer 1..{MAX_Z}")
    return z


def read_indices(path: Path) -> np.ndarray:
    """(K,) int64 frame indices of an rMD17 split file (one integer per line)."""
    try:
        return np.loadtxt(path, dtype=np.int64).reshape(-1)
    except ValueError as exc:
        raise ValueError(f"{path}: expected one frame index (integer) per line: {exc}") from exc


def is_online(url: str, timeout: float = 3.0) -> bool:
    """True if a TCP connection to ``url``'s host can be opened within ``timeout`` seconds."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pyg_name(molecule: str, variant: str) -> str:
    mol = molecule.strip().lower().replace("_", " ").replace("-", " ")
    if mol == "salicylic":
        mol = "salicylic acid"
    names = _PyGMD17.file_names
    if variant == "revised":
        key = f"revised {mol}"
    elif variant == "original":
        key = mol
    else:
        matches = [k for k in names if "CCSD" in k and k.split(" CCSD")[0] == mol]
        key = matches[0] if matches else f"{mol} CCSD(T)"
    if key not in names:
        raise ValueError(f"unknown {variant} MD17 molecule {molecule!r}; available: {available_molecules(variant)}")
    return key


def available_molecules(variant: str = "revised") -> List[str]:
    variant = VARIANTS.get(str(variant).lower(), variant)
    names = _PyGMD17.file_names
    if variant == "revised":
        return [k[len("revised "):] for k in names if k.startswith("revised ")]
    if variant == "ccsd":
        return [k.split(" CCSD")[0] for k in names if "CCSD" in k]
    return [k for k in names if not k.startswith("revised ") and "CCSD" not in k and "FHI" not in k]


class MD17DataModule(PotentialDataModule):
    """MD17 molecules by name (``variant`` ``"revised"`` | ``"original"`` | ``"ccsd"``).

    Field protocol (default): ``num_train`` + ``num_val`` = 950 + 50 frames drawn with ``seed``
    from the 1000-frame training split ``split``; test on the separate 1000-frame test split
    (``num_test`` caps it with a seeded random subset). The original MD17 has no official split:
    a random pool of ``num_train + num_val`` frames and ``num_test`` (default 1000) disjoint test
    frames are drawn with seed ``split`` (the test frames first, so they do not depend on the
    pool size). CCSD(T): the files' own train/test parts.

    Args:
        molecule: e.g. ``"ethanol"``, ``"aspirin"``, ``"salicylic"`` (see :func:`available_molecules`).
        root: data folder (default: :func:`~pyg_equireann.datamodules.base.default_data_root`).
        download: ``None`` (download missing files if the server is reachable), ``True``, ``False``.
        **kwargs: :class:`~pyg_equireann.datamodules.base.PotentialDataModule` arguments.
    """

    def __init__(
        self,
        molecule: str = "ethanol",
        variant: str = "revised",
        root: str | os.PathLike | None = None,
        num_train: int = 950,
        num_val: int = 50,
        num_test: Optional[int] = None,
        split: int = 1,
        download: Optional[bool] = None,
        atomic_energies: AtomicEnergiesSpec = None,
        **kwargs,
    ) -> None:
        super().__init__(atomic_energies=atomic_energies, **kwargs)
        self.save_hyperparameters()
        from pyg_equireann.datamodules.structures import plain_hparams

        plain_hparams(self)  # plain types only: checkpoints load with torch.load(weights_only=True)
        v = VARIANTS.get(str(variant).lower())
        if v is None:
            raise ValueError(f"unknown MD17 variant {variant!r}; use 'revised', 'original' or 'ccsd'")
        self.variant = v
        self.pyg_name = _pyg_name(molecule, v)
        self.molecule = molecule
        self.root = Path(default_data_root() if root is None else root).expanduser()
        self.num_train, self.num_val, self.num_test = int(num_train), int(num_val), num_test
        if self.num_train < 1 or self.num_val < 0:
            raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
        self.split = int(split)
        if self.variant == "revised" and not 1 <= self.split <= 5:
            raise ValueError(f"rMD17 has splits 1..5, got split={split}")
        self.download = download

    # ------------------------------------------------------------------ files
    @property
    def _file_name(self) -> str:
        return _PyGMD17.file_names[self.pyg_name]

    @property
    def _stem(self) -> str:  # rmd17_ethanol, md17_ethanol, ethanol_ccsd_t
        return self._file_name.rsplit(".", 1)[0]

    def _locate(self) -> Optional[dict]:
        """Paths of the present files (dict with kind/train/test[/train_csv/test_csv/full]) or None."""
        r, s = self.root, f"{self.split:02d}"
        if self.variant == "revised":
            for d in (r / "rmd17", r):
                tr, te = d / f"{self._stem}_train_{s}.npz", d / f"{self._stem}_test_{s}.npz"
                if tr.is_file() and te.is_file():
                    return {"kind": "split_files", "train": tr, "test": te}
            for base in (r / "rmd17", r / "raw" / "rmd17"):
                full = base / "npz_data" / self._file_name
                tr, te = base / "splits" / f"index_train_{s}.csv", base / "splits" / f"index_test_{s}.csv"
                if full.is_file() and tr.is_file() and te.is_file():
                    return {"kind": "archive", "full": full, "train_csv": tr, "test_csv": te}
            return None
        if self.variant == "original":
            for d in (r / "md17", r / self.pyg_name / "raw", r):
                if (d / self._file_name).is_file():
                    return {"kind": "single", "full": d / self._file_name}
            return None
        for d in (r / "md17_ccsd", r / self.pyg_name / "raw", r):
            tr, te = d / f"{self._stem}-train.npz", d / f"{self._stem}-test.npz"
            if tr.is_file() and te.is_file():
                return {"kind": "ccsd", "train": tr, "test": te}
        return None

    def _url(self) -> str:
        return REVISED_URL if self.variant == "revised" else f"{GDML_URL}/{self._file_name}"

    def _missing_message(self, reason: str) -> str:
        return self._missing_files(reason) + data_root_hint(self.root)

    def _missing_files(self, reason: str) -> str:
        r, s = self.root.resolve(), f"{self.split:02d}"
        if self.variant == "revised":
            return (
                f"rMD17 files for {self.molecule!r} (split {s}) not found under {r}. Put "
                f"{self._stem}_train_{s}.npz and {self._stem}_test_{s}.npz (keys nuclear_charges, coords, energies, "
                f"forces) into the folder {r / 'rmd17'}, or extract the official archive rmd17.tar.bz2 into {r} so that "
                f"{r / 'rmd17' / 'npz_data' / self._file_name} and {r / 'rmd17' / 'splits' / f'index_train_{s}.csv'} "
                f"(and index_test_{s}.csv) exist. Download: {REVISED_URL} (also {RMD17_FIGSHARE}). {reason}"
            )
        if self.variant == "original":
            return (
                f"MD17 file {self._file_name} for {self.molecule!r} not found: put it into the folder {r / 'md17'}. "
                f"Download: {self._url()}. {reason}"
            )
        return (
            f"CCSD(T) MD17 files {self._stem}-train.npz and {self._stem}-test.npz for {self.molecule!r} not found: "
            f"put them into the folder {r / 'md17_ccsd'} (they are inside {self._file_name}). "
            f"Download: {self._url()}. {reason}"
        )

    def _download(self) -> None:
        from torch_geometric.data import download_url, extract_tar, extract_zip

        self.root.mkdir(parents=True, exist_ok=True)
        if self.variant == "revised":
            path = download_url(REVISED_URL, str(self.root), filename="rmd17.tar.bz2")
            extract_tar(path, str(self.root), mode="r:bz2")
            os.unlink(path)
        elif self.variant == "original":
            download_url(self._url(), str(self.root / "md17"))
        else:
            folder = self.root / "md17_ccsd"
            path = download_url(self._url(), str(folder))
            extract_zip(path, str(folder))
            os.unlink(path)

    def _files(self, allow_download: bool = True) -> dict:
        found = self._locate()
        if found is not None:
            return found
        if not allow_download or self.download is False:
            raise FileNotFoundError(self._missing_message("Downloading is disabled (download=False)."))
        if not is_online(self._url()):
            raise FileNotFoundError(self._missing_message("No network connection, so nothing was downloaded."))
        self._download()
        found = self._locate()
        if found is None:
            raise FileNotFoundError(self._missing_message("The download did not produce the expected files."))
        return found

    def prepare_data(self) -> None:
        self._files()

    # ------------------------------------------------------------------ processing
    def _npz_dataset(self, path: Path, frames: Optional[np.ndarray], tag: str) -> StructureDataset:
        """Frames ``frames`` (all if None) of an npz file, converted to eV, with graphs; cached."""
        path = path.resolve()
        sel = None if frames is None else np.asarray(frames, dtype=np.int64)
        key = _cache.make_key(
            "md17", self.variant, _cache.file_fingerprint(path), self.cutoff, dtype_name(self.dtype),
            None if sel is None else _cache.make_key(sel.tobytes().hex()),
        )
        name = f"{path.stem}-{tag}" if tag else path.stem
        state = _cache.cached(path, name, key, lambda: self._process_npz(path, sel, key), self.cache)
        return StructureDataset.from_state(state)

    def _process_npz(self, path: Path, sel: Optional[np.ndarray], key: str) -> dict:
        zk, rk, ek, fk = _KEYS[self.variant]
        source = str(path)
        raw = read_npz(path, (zk, rk, ek, fk))
        z = atomic_numbers_of(raw[zk], source, zk)
        coords, energies, forces = raw[rk], raw[ek], raw[fk]
        n = len(z)
        if coords.ndim != 3 or coords.shape[1:] != (n, 3):
            raise ValueError(f"{source}: key {rk!r} has shape {coords.shape}; expected (frames, {n}, 3) for the {n} "
                             f"atoms of {zk!r}")
        n_frames = coords.shape[0]
        if n_frames == 0:
            raise ValueError(f"{source}: key {rk!r} has no frames")
        for k, value in ((ek, energies), (fk, forces)):
            if value.ndim == 0 or value.shape[0] != n_frames:
                frames = value.shape[0] if value.ndim else "no"
                raise ValueError(f"{source}: key {k!r} has {frames} frames (shape {value.shape}) but {rk!r} has "
                                 f"{n_frames} (shape {coords.shape}); all arrays need one entry per frame")
        if sel is None:
            sel = np.arange(n_frames)
        elif sel.size and (sel.min() < 0 or sel.max() >= n_frames):
            raise ValueError(f"{source}: frame indices out of range 0..{n_frames - 1}")
        coords = np.asarray(coords[sel], dtype=np.float64)
        energies = np.asarray(energies, dtype=np.float64).reshape(n_frames, -1)[sel]
        forces = np.asarray(forces[sel], dtype=np.float64)
        if energies.shape[1] != 1:
            raise ValueError(f"{source}: key {ek!r} must hold one energy per frame, got shape {energies.shape}")
        if forces.shape != coords.shape:
            raise ValueError(f"{source}: key {fk!r} has shape {forces.shape}; expected {coords.shape} (frames, atoms, 3)")
        check_finite(coords, f"positions ({rk!r})", source, sel, per_atom=True)
        check_finite(energies, f"energy ({ek!r})", source, sel)
        check_finite(forces, f"forces ({fk!r})", source, sel, per_atom=True)
        energies = energies[:, 0] * KCAL_PER_MOL  # kcal/mol -> eV
        forces = forces * KCAL_PER_MOL  # kcal/mol/Å -> eV/Å
        data_list = [
            make_data(z, coords[k], energies[k], sel[k], self.dtype, forces=forces[k]) for k in range(len(sel))
        ]
        if not data_list:
            raise ValueError(f"{source}: no frames selected")
        attach_edges(data_list, self.cutoff, desc=f"graphs {path.name}", progress=self.progress, source=source)
        meta = {"has_forces": True, "num_frames": int(n_frames), "units": "converted from kcal/mol to eV"}
        return StructureDataset.from_data_list(data_list, source, key, meta).to_state()

    # ------------------------------------------------------------------ splits
    def _pool_sizes(self, available: int, what: str) -> None:
        if self.num_train + self.num_val > available:
            raise ValueError(
                f"num_train + num_val = {self.num_train} + {self.num_val} exceeds the {available} frames of {what}"
            )

    def _train_val(self, pool: StructureDataset) -> Tuple[StructureDataset, StructureDataset]:
        self._pool_sizes(len(pool), pool.source)
        perm = np.random.default_rng(self.seed).permutation(len(pool))
        return subset(pool, perm[: self.num_train]), subset(pool, perm[self.num_train : self.num_train + self.num_val])

    def _load(self) -> Tuple[StructureDataset, StructureDataset, Dict[str, StructureDataset]]:
        files = self._files()
        kind = files["kind"]
        if kind in ("split_files", "ccsd"):
            pool = self._npz_dataset(files["train"], None, "")
            test = self._npz_dataset(files["test"], None, "")
        elif kind == "archive":
            tr, te = read_indices(files["train_csv"]), read_indices(files["test_csv"])
            pool = self._npz_dataset(files["full"], tr, f"train_{self.split:02d}")
            test = self._npz_dataset(files["full"], te, f"test_{self.split:02d}")
        else:  # original MD17: random pool and test frames, seeded by the split number
            coords = read_npz(files["full"], (_KEYS["original"][1],))[_KEYS["original"][1]]
            n_frames = int(coords.shape[0]) if coords.ndim else 0
            n_pool = self.num_train + self.num_val
            n_test = SPLIT_SIZE if self.num_test is None else int(self.num_test)
            self._pool_sizes(n_frames - n_test, f"{files['full']} minus {n_test} test frames")
            perm = np.random.default_rng(self.split).permutation(n_frames)
            # test frames first, so the test set does not depend on num_train/num_val
            test = self._npz_dataset(files["full"], np.sort(perm[:n_test]), f"test{n_test}_split{self.split}")
            pool = self._npz_dataset(
                files["full"], np.sort(perm[n_test : n_test + n_pool]), f"pool{n_pool}_split{self.split}"
            )
        train, val = self._train_val(pool)
        test = random_subset(test, self.num_test, self.seed)
        return train, val, {"test": test}
