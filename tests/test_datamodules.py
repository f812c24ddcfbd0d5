"""Tests of the Lightning data modules in ``datamodules/`` (MD17 family, XYZ files, caching)."""
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from torch_geometric.data import Batch

import pyg_equireann.datamodules
from pyg_equireann.datamodules import MD17DataModule, XYZDataModule, acac_datamodule, cumulene_datamodule
from pyg_equireann.datamodules import md17 as md17_module
from pyg_equireann.graph.neighbors import build_graph

DATA = Path(__file__).resolve().parents[1] / "data"
# 1 kcal/mol in eV by hand: 4184 J / N_A / e (CODATA 2018; ASE uses CODATA 2014, 8e-9 relative difference)
KCAL_MOL_EV = 4184.0 / (6.02214076e23 * 1.602176634e-19)


@pytest.fixture(autouse=True)
def _never_download(monkeypatch):
    """No test may touch the network: pretend to be offline and fail on any download attempt."""
    monkeypatch.setattr(md17_module, "is_online", lambda *a, **k: False)

    def no_download(self):
        raise AssertionError("a download was attempted in a test")

    monkeypatch.setattr(MD17DataModule, "_download", no_download)


@pytest.fixture
def rmd17_root(tmp_path):
    """A private copy of the shipped ethanol rMD17 split (so caches go to tmp)."""
    (tmp_path / "rmd17").mkdir()
    for split in ("train", "test"):
        shutil.copy(DATA / "rmd17" / f"rmd17_ethanol_{split}_01.npz", tmp_path / "rmd17")
    return tmp_path


def check_graphs(batch, cutoff):
    """Stored edges of a batch equal build_graph recomputed on the batch."""
    assert isinstance(batch, Batch)
    edge_index, offsets = build_graph(batch.pos, cutoff, batch.batch, batch.get("cell"), batch.get("pbc"))
    assert torch.equal(batch.edge_index, edge_index)
    if offsets is not None:
        assert torch.equal(batch.cell_offsets, offsets)


# --------------------------------------------------------------------------- MD17


def test_md17_units_against_raw_file(rmd17_root):
    dm = MD17DataModule("ethanol", root=rmd17_root, num_train=20, num_val=5, num_test=10, download=False, progress=False)
    dm.setup()
    assert pyg_equireann.datamodules.KCAL_PER_MOL == pytest.approx(KCAL_MOL_EV, rel=1e-7)
    assert pyg_equireann.datamodules.KCAL_PER_MOL == pytest.approx(0.0433641, rel=1e-6)
    raw = {s: np.load(rmd17_root / "rmd17" / f"rmd17_ethanol_{s}_01.npz") for s in ("train", "test")}
    for split, ds in (("train", dm.train_dataset), ("train", dm.val_dataset), ("test", dm.test_datasets["test"])):
        d = ds[3]
        k = int(d.idx)
        assert d.z.dtype == torch.long and d.pos.dtype == torch.float32 and d.energy.dtype == torch.float64
        assert d.energy.shape == (1,) and d.idx.shape == (1,)
        assert "cell" not in d and "pbc" not in d
        assert d.energy.item() == pytest.approx(raw[split]["energies"][k] * KCAL_MOL_EV, rel=1e-7)
        np.testing.assert_allclose(d.forces.numpy(), raw[split]["forces"][k] * KCAL_MOL_EV, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(d.pos.numpy(), raw[split]["coords"][k], atol=1e-6)
        assert torch.equal(d.z, torch.as_tensor(raw[split]["nuclear_charges"], dtype=torch.long))
        assert torch.equal(d.edge_index, build_graph(d.pos, 4.0)[0])
    assert dm.elements == [1, 6, 8]
    assert set(dm.statistics) >= {"atomic_energies", "shift", "scale", "avg_num_neighbors"}


def test_md17_field_protocol_split(rmd17_root):
    dm = MD17DataModule("ethanol", root=rmd17_root, download=False, progress=False)
    dm.setup()
    train, val = dm.train_dataset.frame_indices(), dm.val_dataset.frame_indices()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_datasets["test"])) == (950, 50, 1000)
    assert not set(train.tolist()) & set(val.tolist())
    assert set(train.tolist()) | set(val.tolist()) == set(range(1000))
    assert dm.test_datasets["test"].source.endswith("rmd17_ethanol_test_01.npz")
    assert dm.test_names == ["test"] and len(dm.test_dataloader()) == 1
    same = MD17DataModule("ethanol", root=rmd17_root, download=False, progress=False)
    same.setup()
    assert torch.equal(same.val_dataset.frame_indices(), val)
    other = MD17DataModule("ethanol", root=rmd17_root, seed=1, download=False, progress=False)
    other.setup()
    assert not torch.equal(other.val_dataset.frame_indices(), val)
    with pytest.raises(ValueError, match="exceeds the 1000 frames"):
        MD17DataModule("ethanol", root=rmd17_root, num_train=990, num_val=20, download=False).setup()


def test_md17_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        MD17DataModule("aspirin", root=tmp_path, download=False).setup()
    msg = str(err.value)
    assert "rmd17_aspirin_train_01.npz" in msg and "rmd17_aspirin_test_01.npz" in msg
    assert str(tmp_path / "rmd17") in msg and "http" in msg
    # automatic mode while offline: no download attempt, same kind of message
    with pytest.raises(FileNotFoundError, match="No network connection"):
        MD17DataModule("aspirin", root=tmp_path).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"md17_ethanol\.npz.*" + str(tmp_path / "md17")):
        MD17DataModule("ethanol", variant="original", root=tmp_path, download=False).setup()
    with pytest.raises(FileNotFoundError, match="ethanol_ccsd_t-train.npz"):
        MD17DataModule("ethanol", variant="ccsd", root=tmp_path, download=False).setup()
    with pytest.raises(ValueError, match="unknown revised MD17 molecule"):
        MD17DataModule("water")


def _ethanol_arrays(n):
    raw = np.load(DATA / "rmd17" / "rmd17_ethanol_train_01.npz")
    return raw["nuclear_charges"], raw["coords"][:n], raw["energies"][:n], raw["forces"][:n]


def test_md17_official_archive_layout(tmp_path):
    z, r, e, f = _ethanol_arrays(60)
    (tmp_path / "rmd17" / "npz_data").mkdir(parents=True)
    (tmp_path / "rmd17" / "splits").mkdir()
    np.savez(tmp_path / "rmd17" / "npz_data" / "rmd17_ethanol.npz", nuclear_charges=z, coords=r, energies=e, forces=f)
    train_idx, test_idx = np.arange(0, 60, 2), np.arange(1, 60, 2)
    np.savetxt(tmp_path / "rmd17" / "splits" / "index_train_01.csv", train_idx, fmt="%d")
    np.savetxt(tmp_path / "rmd17" / "splits" / "index_test_01.csv", test_idx, fmt="%d")
    dm = MD17DataModule("ethanol", root=tmp_path, num_train=25, num_val=5, download=False, progress=False)
    dm.setup()
    assert set(dm.train_dataset.frame_indices().tolist()) | set(dm.val_dataset.frame_indices().tolist()) == set(train_idx.tolist())
    assert dm.test_datasets["test"].frame_indices().tolist() == test_idx.tolist()
    d = dm.test_datasets["test"][4]
    assert d.energy.item() == pytest.approx(e[int(d.idx)] * KCAL_MOL_EV, rel=1e-7)


def test_md17_original_and_ccsd_layouts(tmp_path):
    z, r, e, f = _ethanol_arrays(200)
    (tmp_path / "md17").mkdir()
    np.savez(tmp_path / "md17" / "md17_ethanol.npz", z=z, R=r, E=e[:, None], F=f)
    dm = MD17DataModule("ethanol", variant="original", root=tmp_path, num_train=40, num_val=10, num_test=100,
                        download=False, progress=False)
    dm.setup()
    tr, va, te = (set(ds.frame_indices().tolist()) for ds in (dm.train_dataset, dm.val_dataset, dm.test_datasets["test"]))
    assert (len(tr), len(va), len(te)) == (40, 10, 100) and not (tr & va) and not (tr & te) and not (va & te)
    d = dm.train_dataset[0]
    assert d.energy.item() == pytest.approx(e[int(d.idx)] * KCAL_MOL_EV, rel=1e-7)

    (tmp_path / "md17_ccsd").mkdir()
    np.savez(tmp_path / "md17_ccsd" / "ethanol_ccsd_t-train.npz", z=z, R=r[:100], E=e[:100, None], F=f[:100])
    np.savez(tmp_path / "md17_ccsd" / "ethanol_ccsd_t-test.npz", z=z, R=r[100:], E=e[100:, None], F=f[100:])
    dm = MD17DataModule("ethanol", variant="ccsd", root=tmp_path, num_train=80, num_val=20, download=False, progress=False)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_datasets["test"])) == (80, 20, 100)
    d = dm.test_datasets["test"][7]
    assert d.energy.item() == pytest.approx(e[100 + int(d.idx)] * KCAL_MOL_EV, rel=1e-7)


# --------------------------------------------------------------------------- XYZ helpers


def random_molecule(rng, symbols_pool=("H", "C", "O")):
    counts = rng.integers(1, 4, size=len(symbols_pool))
    symbols = [s for s, c in zip(symbols_pool, counts) for _ in range(c)]
    n = len(symbols)
    grid = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], dtype=float)
    pos = 1.3 * grid[rng.permutation(len(grid))[:n]] + 0.1 * rng.standard_normal((n, 3))
    atoms = Atoms(symbols, positions=pos)
    atoms.calc = EMT()
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
    return atoms


def write_molecules(path, n, seed=0, symbols_pool=("H", "C", "O"), custom=False):
    rng = np.random.default_rng(seed)
    frames = [random_molecule(rng, symbols_pool) for _ in range(n)]
    if custom:  # values under custom keys (kept in info/arrays by ASE), scaled to tell them apart
        for a in frames:
            a.info["REF_energy"] = 2.0 * a.get_potential_energy()
            a.new_array("REF_forces", 2.0 * a.get_forces())
    ase.io.write(path, frames, format="extxyz")
    return frames


def write_periodic(path, n=4, seed=0, with_molecule=False):
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)
        atoms.positions += 0.05 * rng.standard_normal(atoms.positions.shape)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.calc = EMT()
        res = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **res)
        frames.append(atoms)
    if with_molecule:  # a non-periodic Cu cluster in the same file
        atoms = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
        atoms.calc = EMT()
        res = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=np.zeros(6))
        atoms.calc = SinglePointCalculator(atoms, **res)
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return frames


# --------------------------------------------------------------------------- XYZ


def test_xyz_keys_and_random_split(tmp_path):
    f = tmp_path / "mols.xyz"
    frames = write_molecules(f, 40, custom=True)
    dm = XYZDataModule(f, val_fraction=0.1, test_fraction=0.2, energy_key="REF_energy", forces_key="REF_forces",
                       progress=False)
    dm.setup()
    sets = [set(ds.frame_indices().tolist()) for ds in (dm.train_dataset, dm.val_dataset, dm.test_datasets["test"])]
    assert [len(s) for s in sets] == [28, 4, 8]
    assert set.union(*sets) == set(range(40)) and sum(len(s) for s in sets) == 40
    d = dm.val_dataset[1]
    a = frames[int(d.idx)]
    assert d.energy.item() == pytest.approx(2.0 * a.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(d.forces.numpy(), 2.0 * a.get_forces(), rtol=1e-6, atol=1e-6)
    assert "stress" not in d and "cell" not in d
    # default keys read the calculator values (ASE >= 3.23 moves energy/forces there)
    dm2 = XYZDataModule(f, val_fraction=0.1, test_fraction=0.2, progress=False, cache=False)
    dm2.setup()
    d2 = dm2.val_dataset[1]
    assert int(d2.idx) == int(d.idx)  # same seed, same split
    assert d2.energy.item() == pytest.approx(a.get_potential_energy(), rel=1e-12)
    dm3 = XYZDataModule(f, val_fraction=0.1, test_fraction=0.2, seed=3, progress=False, cache=False)
    dm3.setup()
    assert not torch.equal(dm3.val_dataset.frame_indices(), dm2.val_dataset.frame_indices())
    capped = XYZDataModule(f, num_train=5, num_test=3, test_fraction=0.2, progress=False, cache=False)
    capped.setup()
    assert len(capped.train_dataset) == 5 and len(capped.test_datasets["test"]) == 3


def test_xyz_separate_files_and_loaders(tmp_path):
    write_molecules(tmp_path / "train.xyz", 30, seed=1)
    write_molecules(tmp_path / "val.xyz", 6, seed=2)
    write_molecules(tmp_path / "a.xyz", 5, seed=3)
    write_molecules(tmp_path / "b.xyz", 4, seed=4)
    dm = XYZDataModule(tmp_path / "train.xyz", val_file=tmp_path / "val.xyz",
                       test_files={"A": tmp_path / "a.xyz", "B": tmp_path / "b.xyz"}, batch_size=7, eval_batch_size=3,
                       cutoff=3.0, progress=False)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (30, 6)
    assert dm.test_names == ["A", "B"] and [len(ds) for ds in dm.test_datasets.values()] == [5, 4]
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0].num_graphs == 7
    for b in batches + list(dm.val_dataloader()) + [b for dl in dm.test_dataloader() for b in dl]:
        check_graphs(b, 3.0)
        assert b.energy.shape == (b.num_graphs,) and b.idx.shape == (b.num_graphs,)
    order = [b.idx.tolist() for b in dm.train_dataloader()]
    assert order == [b.idx.tolist() for b in batches]  # seeded shuffling
    assert sorted(sum(order, [])) == list(range(30))
    dm.setup()  # idempotent
    assert len(dm.train_dataset) == 30


def test_xyz_periodic_cell_and_stress(tmp_path):
    f = tmp_path / "cu.xyz"
    frames = write_periodic(f, n=5, with_molecule=True)
    dm = XYZDataModule(f, val_fraction=0.0, test_fraction=0.0, cutoff=3.0, dtype="float64", progress=False)
    dm.setup()
    assert len(dm.train_dataset) == 6 and dm.elements == [29]
    for d in dm.train_dataset:
        a = frames[int(d.idx)]
        assert d.pos.dtype == torch.float64 and d.cell.shape == (1, 3, 3) and d.pbc.shape == (1, 3)
        assert d.stress.shape == (1, 3, 3) and d.cell_offsets.shape == (d.edge_index.shape[1], 3)
        np.testing.assert_allclose(d.stress[0].numpy(), a.get_stress(voigt=False), atol=1e-12)
        if a.pbc.any():
            np.testing.assert_allclose(d.cell[0].numpy(), a.cell.array, atol=1e-12)
            assert d.pbc.all()
            ei, off = build_graph(d.pos, 3.0, None, d.cell, d.pbc)
            assert torch.equal(ei, d.edge_index) and torch.equal(off, d.cell_offsets)
            assert float(d.cell_offsets.abs().sum()) > 0
        else:  # molecule in a periodic file: zero cell, pbc False
            assert not d.pbc.any() and float(d.cell.abs().sum()) == 0.0
    for b in dm.train_dataloader():
        check_graphs(b, 3.0)
        assert b.cell.shape == (b.num_graphs, 3, 3)


def test_xyz_e0_least_squares_matches_numpy(tmp_path):
    f = tmp_path / "mols.xyz"
    frames = write_molecules(f, 30, seed=5)
    dm = XYZDataModule(f, val_fraction=0.2, progress=False, cache=False)
    dm.setup()
    train = [frames[i] for i in dm.train_dataset.frame_indices().tolist()]
    elements = [1, 6, 8]
    A = np.array([[np.sum(a.numbers == z) for z in elements] for a in train], dtype=float)
    y = np.array([a.get_potential_energy() for a in train])
    e0 = np.linalg.lstsq(A, y, rcond=None)[0]
    got = dm.statistics["atomic_energies"]
    assert sorted(got) == elements
    np.testing.assert_allclose([got[z] for z in elements], e0, rtol=1e-8, atol=1e-8)
    forces = np.concatenate([a.get_forces().ravel() for a in train])
    assert dm.statistics["scale"] == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-5)


def test_xyz_e0_from_isolated_atoms_file_and_dict(tmp_path):
    f = tmp_path / "mols.xyz"
    write_molecules(f, 10)
    iso = tmp_path / "isolated.xyz"
    e0 = {1: -13.5, 6: -1026.8, 8: -2037.7}
    atoms = []
    for z, e in e0.items():
        a = Atoms(numbers=[z], positions=[[0, 0, 0]])
        a.info["config_type"] = "IsolatedAtom"
        a.calc = SinglePointCalculator(a, energy=e)
        atoms.append(a)
    ase.io.write(iso, atoms, format="extxyz")
    dm = XYZDataModule(f, atomic_energies=iso, progress=False, cache=False)
    with pytest.warns(UserWarning, match="isolated-atom energies"):  # EMT energies with all-electron-like E0
        dm.setup()
    assert dm.statistics["atomic_energies"] == e0
    dm = XYZDataModule(f, atomic_energies={"H": -1.0, "C": -2.0, 8: -3.0}, progress=False, cache=False)
    dm.setup()
    assert dm.statistics["atomic_energies"] == {1: -1.0, 6: -2.0, 8: -3.0}
    with pytest.raises(KeyError, match=r"O \(Z=8\)"):
        XYZDataModule(f, atomic_energies={"H": -1.0, "C": -2.0}, progress=False, cache=False).setup()


def _write_text(path, text):
    path.write_text(text)
    return path


GOOD = (
    "2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc=\"F F F\"\n"
    "H 0 0 0 0.1 0 0\nO 0 0 1 -0.1 0 0\n"
)


def test_xyz_errors_name_file_frame_key(tmp_path):
    good = _write_text(tmp_path / "good.xyz", GOOD * 3)
    kw = dict(val_fraction=0.0, progress=False, cache=False)
    with pytest.raises(FileNotFoundError, match="nothere.xyz"):
        XYZDataModule(tmp_path / "nothere.xyz", **kw).setup()
    empty = _write_text(tmp_path / "empty.xyz", "")
    with pytest.raises(ValueError, match=r"empty\.xyz.*empty"):
        XYZDataModule(empty, **kw).setup()
    # missing energy key: names file, frame, key and lists the available keys
    with pytest.raises(KeyError) as err:
        XYZDataModule(good, energy_key="REF_energy", **kw).setup()
    msg = str(err.value)
    assert "good.xyz" in msg and "frame 0" in msg and "REF_energy" in msg and "energy" in msg
    with pytest.raises(KeyError, match=r"good\.xyz.*no forces under key 'REF_forces'"):
        XYZDataModule(good, forces_key="REF_forces", **kw).setup()
    XYZDataModule(good, forces_key=None, **kw).setup()  # energies only is fine
    # wrong forces shape
    bad_shape = _write_text(
        tmp_path / "shape.xyz",
        GOOD + "2\nProperties=species:S:1:pos:R:3:REF_forces:R:2 energy=-1.0 pbc=\"F F F\"\nH 0 0 0 0.1 0\nO 0 0 1 -0.1 0\n",
    )
    with pytest.raises(ValueError, match=r"shape\.xyz: frame 1: forces key 'REF_forces' has shape \(2, 2\)"):
        XYZDataModule(bad_shape, forces_key="REF_forces", **kw).setup()
    # NaN in forces (atom 1 of frame 2), energy (frame 1) and positions
    nan_f = _write_text(tmp_path / "nanf.xyz", GOOD * 2 + GOOD.replace("-0.1 0 0", "nan 0 0"))
    with pytest.raises(ValueError, match=r"nanf\.xyz: frame 2: forces key 'forces' of atom 1 .*NaN"):
        XYZDataModule(nan_f, **kw).setup()
    nan_e = _write_text(tmp_path / "nane.xyz", GOOD + GOOD.replace("energy=-1.0", "energy=nan"))
    with pytest.raises(ValueError, match=r"nane\.xyz: frame 1: energy key 'energy'.*NaN"):
        XYZDataModule(nan_e, **kw).setup()
    nan_p = _write_text(tmp_path / "nanp.xyz", GOOD.replace("O 0 0 1", "O 0 nan 1"))
    with pytest.raises(ValueError, match=r"nanp\.xyz: frame 0: positions of atom 1"):
        XYZDataModule(nan_p, **kw).setup()


def test_xyz_test_set_with_unknown_element(tmp_path):
    train = tmp_path / "train.xyz"
    write_molecules(train, 10, symbols_pool=("H", "C"))
    test = tmp_path / "test.xyz"
    write_molecules(test, 3, seed=1, symbols_pool=("H", "O"))
    dm = XYZDataModule(train, test_files={"hetero": test}, progress=False, cache=False)
    with pytest.raises(ValueError) as err:
        dm.setup()
    msg = str(err.value)
    assert "O (Z=8)" in msg and "'hetero'" in msg and "test.xyz" in msg and "frame 0" in msg


# --------------------------------------------------------------------------- cache


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    f = tmp_path / "mols.xyz"
    write_molecules(f, 20)
    calls = []
    original = XYZDataModule._process_file

    def counting(self, path, key, *args):
        calls.append((path.name, self.cutoff))
        return original(self, path, key, *args)

    monkeypatch.setattr(XYZDataModule, "_process_file", counting)
    stats_calls = []
    import pyg_equireann.datamodules.base as base_module

    real_stats = base_module.compute_statistics

    def counting_stats(*a, **k):
        stats_calls.append(1)
        return real_stats(*a, **k)

    monkeypatch.setattr(base_module, "compute_statistics", counting_stats)

    first = XYZDataModule(f, progress=False)
    first.setup()
    assert len(calls) == 1 and len(stats_calls) == 1
    cache_files = list((tmp_path / ".pyg_equireann_cache").glob("*.pt"))
    assert len(cache_files) == 2  # processed file + statistics
    second = XYZDataModule(f, progress=False)
    second.setup()
    assert len(calls) == 1 and len(stats_calls) == 1  # both loaded from the cache
    assert second.statistics == first.statistics
    for a, b in zip(first.train_dataset, second.train_dataset):
        assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.pos, b.pos)
    XYZDataModule(f, cutoff=3.0, progress=False).setup()  # changed cutoff
    assert calls[-1] == ("mols.xyz", 3.0) and len(calls) == 2
    write_molecules(f, 21, seed=9)  # changed file
    changed = XYZDataModule(f, progress=False)
    changed.setup()
    assert len(calls) == 3 and len(changed.train_dataset) + len(changed.val_dataset) == 21
    XYZDataModule(f, progress=False, cache=False).setup()
    assert len(calls) == 4


def test_cache_fallback_when_data_dir_not_writable(tmp_path, monkeypatch):
    from pyg_equireann.datamodules import cache as cache_module

    f = tmp_path / "data" / "mols.xyz"
    f.parent.mkdir()
    write_molecules(f, 8)
    fallback = tmp_path / "fallback"
    monkeypatch.setenv("PYG_EQUIREANN_CACHE", str(fallback))
    real = cache_module._writable_dir
    monkeypatch.setattr(cache_module, "_writable_dir", lambda d: False if d.parent == f.parent else real(d))
    XYZDataModule(f, progress=False).setup()
    assert not (f.parent / ".pyg_equireann_cache").exists()
    assert len(list(fallback.glob("mols-*.pt"))) == 1


# --------------------------------------------------------------------------- shipped data presets


def test_shipped_presets():
    acac = acac_datamodule(num_train=30, num_val=5, num_test=10, cache=False, progress=False)
    acac.setup()
    assert acac.test_names == ["MD_300K", "MD_600K", "dihedral"]
    assert len(acac.train_dataset) == 30 and all(len(ds) == 10 for ds in acac.test_datasets.values())
    iso = pyg_equireann.datamodules.read_isolated_atoms(DATA / "acac" / "isolated_atoms.xyz")
    assert acac.statistics["atomic_energies"] == iso and sorted(iso) == [1, 6, 8]
    check_graphs(next(iter(acac.train_dataloader())), acac.cutoff)

    cum = cumulene_datamodule(num_train=40, num_val=10, num_test=10, cache=False, progress=False)
    cum.setup()
    assert cum.test_names == ["test", "scan", "rigid_xtb", "long"] and cum.elements == [1, 6]
    assert cum.statistics["atomic_energies"] == {1: -10.70721, 6: -48.79808}
    check_graphs(next(iter(cum.test_dataloader()[1])), cum.cutoff)
