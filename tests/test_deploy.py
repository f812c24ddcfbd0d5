"""Periodic training with stress (real Hydra CLI, Lightning Trainer, shipped EMT data), export to a ``.pt2``
package (``equireann-export``) and its round trip, the exported program against the model for every
deployable variant, and the package in a process that cannot import pyg_equireann."""
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from pyg_equireann import REANN, EquiREANN, energy_forces_stress, radius_graph_pbc
from pyg_equireann.deploy.export import INTERFACE_VERSION, ForceField, export, export_model, read_metadata
from pyg_equireann.deploy.package import DeployedPotential
from pyg_equireann.training.module import PotentialModule
from pyg_equireann.utils import count_host_syncs, default_dtype

from .conftest import DATA, make_model, shared_folder, small_periodic_system

BIN = Path(sys.executable).parent
CU = DATA / "cu_emt"


def cli(name, *args, cwd, timeout=600):
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def train_cu(folder):
    run_dir = folder / "run"
    r = cli("equireann-train", "experiment=cu_emt", "model.num_channels=8", "model.num_iterations=1",
            "data.num_train=8", "data.num_val=4", "data.num_test=4", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "num_threads=1", f"hydra.run.dir={run_dir}", cwd=folder)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def cu_run(tmp_path_factory):
    """A 2-epoch ``equireann-train experiment=cu_emt`` run (small EquiREANN, stress in the loss), one for every
    xdist worker (the tests only read it)."""
    return shared_folder(tmp_path_factory, "deploy_cu", train_cu) / "run"


def cu_frames(k=2):
    return ase.io.read(CU / "test.xyz", index=f":{k}")


def test_periodic_training_with_stress(cu_run):
    import csv

    rows = list(csv.DictReader(open(cu_run / "logs" / "metrics.csv")))
    val = [r for r in rows if r.get("val/stress_mae")]
    assert {int(r["epoch"]) for r in val} == {0, 1}
    assert all(math.isfinite(float(r["val/stress_mae"])) and float(r["val/stress_mae"]) > 0 for r in val)
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))
    tested = json.loads((cu_run / "test_metrics.json").read_text())
    assert math.isfinite(tested["test/stress_mae"]) and math.isfinite(tested["test/forces_mae"])
    module = PotentialModule.from_checkpoint(str(cu_run / "checkpoints" / "best.ckpt"))
    assert module.hparams.stress_weight == 1000.0 and module.model.cutoff == 5.0
    assert module.model.elements == [13, 29]


@pytest.fixture(scope="module")
def exported(cu_run, tmp_path_factory):
    """``equireann-export ckpt_path=<run>/checkpoints/best.ckpt`` (default output ``<run>/model.pt2``), once for
    every xdist worker."""
    def export_cu(folder):
        r = cli("equireann-export", f"ckpt_path={cu_run / 'checkpoints' / 'best.ckpt'}", cwd=cu_run)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "largest relative deviation" in r.stdout

    shared_folder(tmp_path_factory, "deploy_cu_exported", export_cu)
    return cu_run / "model.pt2"


def test_export_round_trip(cu_run, exported, tmp_path):
    """The exported package reproduces the checkpoint's energies, forces and stress on real periodic
    frames (a batch of three 32-atom cells; traced with 28 atoms in 2 graphs) to 1e-6 relative (float64);
    its metadata describes it; a package is not a checkpoint."""
    meta = read_metadata(exported)
    assert meta["cutoff"] == 5.0 and meta["elements"] == [13, 29] and meta["dtype"] == "float64"
    assert meta["model_config"]["_target_"] == "pyg_equireann.EquiREANN"
    assert meta["interface_version"] == INTERFACE_VERSION and meta["format"] == "export"
    assert meta["model"] == "EquiREANN"
    assert meta["units"]["energy"] == "eV" and meta["units"]["length"] == "Å"
    assert meta["inputs"] == ["z", "pos", "edge_index", "cell_offsets", "cell", "batch"]

    model = PotentialModule.from_checkpoint(str(cu_run / "checkpoints" / "best.ckpt")).model.double()
    loaded = DeployedPotential.from_file(exported)
    frames = cu_frames(3)
    z = torch.tensor(np.concatenate([a.numbers for a in frames]))
    pos = torch.tensor(np.concatenate([a.positions for a in frames]))
    cell = torch.tensor(np.stack([a.cell.array for a in frames]))
    batch = torch.repeat_interleave(torch.arange(3), 32)
    ref = energy_forces_stress(model, z, pos, batch, cell=cell, compute_stress=True)
    edge_index, offsets = model.build_graph(pos, batch, cell, None)
    got = loaded(z, pos, edge_index, offsets, cell, batch)
    assert rel(got["energy"], ref["energy"].detach()) < 1e-6
    assert rel(got["forces"], ref["forces"]) < 1e-6
    assert rel(got["stress"], ref["stress"]) < 1e-6
    assert torch.allclose(got["atomic_energies"].view(3, 32).sum(1), got["energy"], rtol=1e-12)
    with pytest.raises(ValueError, match="is a model written by equireann-export, not a training checkpoint"):
        export(str(exported), str(tmp_path / "x.pt2"))


def test_exported_model_needs_only_torch(cu_run, exported, tmp_path):
    """The package loads with plain ``torch.export.load`` and runs in an isolated process (``python -I``) in
    which pyg_equireann, torch_geometric, ase and vesin cannot be imported; the caller passes the list."""
    model = PotentialModule.from_checkpoint(str(cu_run / "checkpoints" / "best.ckpt")).model.double()
    atoms = cu_frames(1)[0]
    z, pos, cell = torch.tensor(atoms.numbers), torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    edge_index, offsets = model.build_graph(pos, None, cell, None)
    np.savez(tmp_path / "frame.npz", z=z.numpy(), pos=pos.numpy(), edge_index=edge_index.numpy(),
             offsets=offsets.numpy(), cell=cell.numpy())
    script = textwrap.dedent(f"""
        import sys
        for name in ("pyg_equireann", "torch_geometric", "ase", "pyg_equireann.datamodules", "vesin"):
            sys.modules[name] = None  # any import of these fails
        import json, numpy as np, torch
        d = {{k: torch.from_numpy(v) for k, v in np.load({str(tmp_path / 'frame.npz')!r}).items()}}
        extra = {{"metadata.json": ""}}
        program = torch.export.load({str(exported)!r}, extra_files=extra).module()
        assert json.loads(extra["metadata.json"])["elements"] == [13, 29]
        n = len(d["z"])
        energy, atomic, forces, virial = program(d["z"], d["pos"], d["edge_index"], d["offsets"], d["cell"][None],
                                                 torch.zeros(n, dtype=torch.long))
        print(repr(float(energy[0])), repr(float(forces.abs().sum())), repr(float(virial.abs().sum())))
    """)
    r = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    energy, force_sum, virial_sum = map(float, r.stdout.split())
    ref = energy_forces_stress(model, z, pos, cell=cell, compute_stress=True)
    assert energy == pytest.approx(float(ref["energy"].detach()), rel=1e-9)
    assert force_sum == pytest.approx(float(ref["forces"].abs().sum()), rel=1e-9)
    virial_ref = ref["stress"][0] * torch.det(cell).abs()  # W = -σV
    assert virial_sum == pytest.approx(float(virial_ref.abs().sum()), rel=1e-9)


MODELS = {
    "equireann": lambda: make_model(EquiREANN, elements=(1, 6, 8), avg_num_neighbors=4.0),
    "equireann_all_elements": lambda: make_model(EquiREANN, max_l=3, num_iterations=3),
    "learned_passing": lambda: make_model(EquiREANN, elements=(1, 6, 8), num_iterations=3, learnable_passing=True),
    "multihop": lambda: make_model(EquiREANN, elements=(1, 6, 8), num_iterations=2, learnable_passing=True,
                                   passing_hops=3, passing_norm=True),
    "nonbacktracking": lambda: make_model(EquiREANN, elements=(1, 6, 8), num_iterations=2, learnable_passing=True,
                                          passing_init="alternating", passing_hops=4, passing_norm=True,
                                          passing_nonbacktracking=True, passing_hop_channels=3),
    "hop_cutoff": lambda: make_model(EquiREANN, elements=(1, 6, 8), num_iterations=2, learnable_passing=True,
                                     passing_init="alternating", passing_hops=4, passing_norm=True,
                                     passing_norm_eps=0.004, passing_nonbacktracking=True, passing_hop_cutoff=2.0),
    "nopassing": lambda: make_model(EquiREANN, elements=(1, 6, 8), equivariant_passing=False),
    "reann": lambda: make_model(REANN, elements=(1, 6, 8), avg_num_neighbors=4.0),
}
#: exported (export takes seconds; the trained EquiREANN of the CLI test, the calculator tests' model and a float32
#: AOTInductor package are exported elsewhere); the others run eagerly through the same ForceField. hop_cutoff: the
#: hops' edge list has a data-dependent length (a nonzero() in the exported graph)
EXPORTED = ("reann", "hop_cutoff")


def calibrated(name):
    model = MODELS[name]()
    model.set_energy_statistics({1: -13.6, 6: -1030.0, 8: -2040.0}, scale=0.8, shift=0.05)
    model.density_scale.copy_(torch.linspace(0.3, 2.0, len(model.density_scale)))  # as after calibration
    return model


def export_packages(folder):
    with default_dtype(torch.float64):  # as the tests build their models (module fixtures run first)
        for name in EXPORTED:
            export_model(calibrated(name), folder / f"{name}.pt2")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    folder = shared_folder(tmp_path_factory, "deploy_packages", export_packages)  # once for every xdist worker
    return {name: DeployedPotential.from_file(folder / f"{name}.pt2") for name in EXPORTED}


def molecule_and_cell():
    """A 4-atom molecule and a skewed 4-atom cell smaller than twice the cutoff (atoms see their own
    images): z, pos, batch, cell (2, 3, 3) with zeros for the molecule, pbc."""
    z, pos, cell = small_periodic_system()
    mol_z, mol_pos = torch.tensor([6, 1, 8, 1]), torch.randn(4, 3, generator=torch.Generator().manual_seed(1)) * 1.3
    return (torch.cat([mol_z, z]), torch.cat([mol_pos, pos]), torch.tensor([0] * 4 + [1] * 4),
            torch.stack([torch.zeros(3, 3), cell]), torch.tensor([[False] * 3, [True] * 3]))


@pytest.mark.parametrize("name", list(MODELS))
def test_deployed_matches_model(name, packages):
    """The exported program (two variants) and the eager ForceField (every variant) = the model (float64):
    energy, forces, stress of a molecule and a small periodic cell in one batch (8 atoms: not the traced
    size), the periodic cell alone, and with a list built with a 1 Å skin (extra pairs contribute 0)."""
    model = calibrated(name)
    deployed = packages[name] if name in packages else DeployedPotential.from_module(model)
    z, pos, batch, cell, pbc = molecule_and_cell()
    ref = energy_forces_stress(model, z, pos, batch, cell=cell, pbc=pbc, compute_stress=True)
    edge_index, offsets = model.build_graph(pos, batch, cell, pbc)
    assert (edge_index[0] == edge_index[1]).any()  # an atom sees its own periodic image
    got = deployed(z, pos, edge_index, offsets, cell, batch)
    assert rel(got["energy"], ref["energy"].detach()) < 1e-12
    assert rel(got["forces"], ref["forces"]) < 1e-10
    assert rel(got["stress"][1], ref["stress"][1]) < 1e-10
    assert torch.allclose(got["atomic_energies"][4:].sum(), got["energy"][1], rtol=1e-13)
    one = deployed.predict(z[4:], pos[4:], cell[1])  # one structure, its own neighbour list
    assert rel(one["forces"], ref["forces"][4:]) < 1e-10 and rel(one["stress"][0], ref["stress"][1]) < 1e-10
    skin_index, skin_offsets = radius_graph_pbc(pos[4:], model.cutoff + 1.0, None, cell[1])
    assert skin_index.shape[1] > model.build_graph(pos[4:], None, cell[1])[0].shape[1]
    skinned = deployed(z[4:], pos[4:], skin_index, skin_offsets, cell[1])
    assert rel(skinned["forces"], ref["forces"][4:]) < 1e-10 and rel(skinned["stress"][0], ref["stress"][1]) < 1e-10
    single = deployed(z[:1], pos[:1], torch.zeros(2, 0, dtype=torch.long))  # one atom, no edges
    assert float(single["energy"][0]) == pytest.approx(float(model(z[:1], pos[:1])[0].detach()), rel=1e-13)


def test_one_host_synchronisation_per_call(packages):
    """The wrapper's checks and the number of graphs cost one host synchronisation per call; the exported
    program itself has none."""
    deployed = packages["reann"]
    z, pos, batch, cell, pbc = molecule_and_cell()
    model = calibrated("reann")
    edge_index, offsets = model.build_graph(pos, batch, cell, pbc)
    one = {"aten::_local_scalar_dense": 1}
    assert count_host_syncs(lambda: deployed(z, pos, edge_index, offsets, cell, batch)) == one
    molecule = model.build_graph(pos[:4])[0]  # no cell: the number of graphs comes from batch, in the same sync
    assert count_host_syncs(lambda: deployed(z[:4], pos[:4], molecule, batch=batch[:4])) == one
    assert count_host_syncs(lambda: deployed.function(z, pos, edge_index, offsets, cell, batch)) == {}


def test_aoti_package_float32():
    """A float32 AOTInductor package (smallest model; compiling takes 22-76 s on the shared 2-core CPU, here
    with the C++ wrapper at -O0 to keep it short) = the model on a batch it was not traced with, energies in
    float64; its metadata is readable with plain torch; another dtype is refused with the command to re-export."""
    import json

    model = make_model(EquiREANN, elements=(1, 6, 8), num_channels=4, num_iterations=1, max_l=1, num_radial=2,
                       embedding_hidden=(4,), message_hidden=(4,), readout_hidden=(4,))
    model.set_energy_statistics({1: -13.6123456, 6: -1030.0, 8: -2040.0}, scale=0.8, shift=0.05)
    with tempfile.TemporaryDirectory() as folder:
        path = export_model(model, Path(folder) / "aoti.pt2", dtype="float32", aoti=True,
                            inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
        assert read_metadata(path)["format"] == "aoti" and read_metadata(path)["dtype"] == "float32"
        plain = torch._inductor.aoti_load_package(str(path))
        assert json.loads(plain.get_metadata()["metadata.json"])["elements"] == [1, 6, 8]
        with pytest.raises(ValueError, match="exported in float32; export the checkpoint again with dtype=float64"):
            DeployedPotential.from_file(path, dtype="float64")
        deployed = DeployedPotential.from_file(path)
        z, pos, batch, cell, pbc = molecule_and_cell()
        ref = energy_forces_stress(model, z, pos, batch, cell=cell, pbc=pbc, compute_stress=True)
        edge_index, offsets = model.build_graph(pos, batch, cell, pbc)
        got = deployed(z, pos, edge_index, offsets, cell, batch)
        assert got["energy"].dtype == torch.float64 and got["forces"].dtype == torch.float32
        assert rel(got["energy"], ref["energy"].detach()) < 1e-7
        assert rel(got["forces"].double(), ref["forces"]) < 1e-4
        assert rel(got["stress"][1].double(), ref["stress"][1]) < 1e-4
    with pytest.raises(ValueError, match="only EquiREANN-family models can be deployed"):
        ForceField(torch.nn.Linear(3, 1))
