"""Periodic training with stress (real Hydra CLI, Lightning Trainer, shipped EMT data), export to
TorchScript (``equireann-export``) and its round trip, the deployed module against the model."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from pyg_equireann import REANN, EquiREANN, energy_forces_stress, radius_graph_pbc
from pyg_equireann.deploy.export import export, read_metadata
from pyg_equireann.deploy.torchscript import DeployedPotential, deploy
from pyg_equireann.training.module import PotentialModule

from .conftest import DATA, make_model, small_periodic_system

BIN = Path(sys.executable).parent
CU = DATA / "cu_emt"


def cli(name, *args, cwd, timeout=600):
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(BIN / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def cu_run(tmp_path_factory):
    """A 2-epoch ``equireann-train experiment=cu_emt`` run (small EquiREANN, stress in the loss)."""
    run_dir = tmp_path_factory.mktemp("cu") / "run"
    r = cli("equireann-train", "experiment=cu_emt", "model.num_channels=8", "model.num_iterations=1",
            "data.num_train=8", "data.num_val=4", "data.num_test=4", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "num_threads=1", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-4000:]
    return run_dir


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
def exported(cu_run):
    """``equireann-export ckpt_path=<run>/checkpoints/best.ckpt`` (default output ``<run>/model.pt``)."""
    r = cli("equireann-export", f"ckpt_path={cu_run / 'checkpoints' / 'best.ckpt'}", cwd=cu_run)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "largest relative deviation" in r.stdout
    return cu_run / "model.pt"


def test_export_round_trip(cu_run, exported, tmp_path):
    """The exported TorchScript file reproduces the checkpoint's energies, forces and stress on real
    periodic frames to 1e-6 relative (float64); metadata describes it; float32 export; bad input."""
    meta = read_metadata(exported)
    assert meta["cutoff"] == 5.0 and meta["elements"] == [13, 29] and meta["dtype"] == "float64"
    assert meta["model_config"]["_target_"] == "pyg_equireann.EquiREANN" and meta["interface_version"] == 2

    ckpt = cu_run / "checkpoints" / "best.ckpt"
    model = PotentialModule.from_checkpoint(str(ckpt)).model.double()
    loaded = torch.jit.load(str(exported))
    for atoms in cu_frames(3):
        z = torch.tensor(atoms.numbers)
        pos = torch.tensor(atoms.positions)
        cell = torch.tensor(atoms.cell.array)
        ref = energy_forces_stress(model, z, pos, cell=cell, compute_stress=True)
        edge_index, offsets = model.build_graph(pos, None, cell, None)
        got = loaded(pos, z, edge_index, offsets @ cell, None, True)
        assert rel(got["energy"], ref["energy"].detach()) < 1e-6
        assert rel(got["forces"], ref["forces"]) < 1e-6
        assert rel(-got["virial"][0] / torch.det(cell).abs(), ref["stress"][0]) < 1e-6
        own = loaded.predict(pos, z, cell, None, True)  # the file's own pure-torch neighbour list
        assert rel(own["forces"], ref["forces"]) < 1e-6

    deviations = export(str(ckpt), str(tmp_path / "f32.pt"), "float32")
    assert max(deviations.values()) < 1e-3
    assert read_metadata(tmp_path / "f32.pt")["dtype"] == "float32"
    r = cli("equireann-export", f"ckpt_path={exported}", f"out={tmp_path / 'x.pt'}", cwd=tmp_path)
    assert r.returncode == 2 and "not a pyg_equireann training checkpoint" in r.stderr


def test_exported_model_needs_only_torch(cu_run, exported, tmp_path):
    """The file loads and runs in a process where pyg_equireann, torch_geometric and ase cannot be imported."""
    atoms = cu_frames(1)[0]
    np.savez(tmp_path / "frame.npz", pos=atoms.positions, z=atoms.numbers, cell=atoms.cell.array)
    script = textwrap.dedent(f"""
        import sys
        for name in ("pyg_equireann", "torch_geometric", "ase", "pyg_equireann.datamodules", "vesin"):
            sys.modules[name] = None  # any import of these fails
        import numpy as np, torch
        d = np.load({str(tmp_path / 'frame.npz')!r})
        model = torch.jit.load({str(exported)!r})
        out = model.predict(torch.tensor(d["pos"]), torch.tensor(d["z"]), torch.tensor(d["cell"]), None, True)
        print(repr(float(out["energy"][0])), repr(float(out["forces"].abs().sum())))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    energy, force_sum = map(float, r.stdout.split())
    model = PotentialModule.from_checkpoint(str(cu_run / "checkpoints" / "best.ckpt")).model.double()
    ref = energy_forces_stress(model, torch.tensor(atoms.numbers), torch.tensor(atoms.positions),
                               cell=torch.tensor(atoms.cell.array))
    assert energy == pytest.approx(float(ref["energy"].detach()), rel=1e-9)
    assert force_sum == pytest.approx(float(ref["forces"].abs().sum()), rel=1e-9)


MODELS = {
    "equireann": lambda: make_model(EquiREANN, elements=(1, 6, 8), avg_num_neighbors=4.0),
    "equireann_all_elements": lambda: make_model(EquiREANN, max_l=3, num_iterations=3),
    "learned_passing": lambda: make_model(EquiREANN, elements=(1, 6, 8), num_iterations=3, learnable_passing=True),
    "nopassing": lambda: make_model(EquiREANN, elements=(1, 6, 8), equivariant_passing=False),
    "reann": lambda: make_model(REANN, elements=(1, 6, 8), avg_num_neighbors=4.0),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_deployed_matches_model(name):
    """Scripted DeployedPotential = EquiREANN/REANN (random weights, float64): energy, forces, stress, for
    a periodic cell smaller than twice the cutoff, a batch, and with the pure-torch neighbour list."""
    model = MODELS[name]()
    model.set_energy_statistics({1: -13.6, 6: -1030.0, 8: -2040.0}, scale=0.8, shift=0.05)
    model.density_scale.copy_(torch.linspace(0.3, 2.0, len(model.density_scale)))  # as after calibration
    scripted = deploy(model)
    z, pos, cell = small_periodic_system()
    ref = energy_forces_stress(model, z, pos, cell=cell, compute_stress=True)
    edge_index, offsets = model.build_graph(pos, None, cell, None)
    got = scripted(pos, z, edge_index, offsets @ cell, None, True)
    assert rel(got["energy"], ref["energy"].detach()) < 1e-12
    assert rel(got["forces"], ref["forces"]) < 1e-10
    assert rel(-got["virial"][0] / torch.det(cell).abs(), ref["stress"][0]) < 1e-10
    own = scripted.predict(pos, z, cell)
    assert rel(own["forces"], ref["forces"]) < 1e-10
    # a list with a 1 Å skin: the extra pairs are dropped, their edge gradients are zero
    skin_index, skin_offsets = radius_graph_pbc(pos, model.cutoff + 1.0, None, cell)
    skinned = scripted(pos, z, skin_index, skin_offsets @ cell, None, True)
    assert skin_index.shape[1] > edge_index.shape[1]
    assert rel(skinned["forces"], ref["forces"]) < 1e-10 and rel(skinned["virial"], got["virial"]) < 1e-10
    far = torch.linalg.vector_norm(pos[skin_index[0]] - pos[skin_index[1]] + skin_offsets @ cell, dim=1) >= model.cutoff
    assert far.any() and (skinned["edge_gradient"][far] == 0).all()
    # per-atom energies sum to the total; edge gradients give the forces
    assert torch.allclose(got["atomic_energies"].sum(), got["energy"][0], rtol=1e-14)
    # a batch: the molecule and the periodic cell (cell offsets of the molecule are zero)
    mol_z, mol_pos = torch.tensor([6, 1, 8, 1]), torch.randn(4, 3, generator=torch.Generator().manual_seed(1)) * 1.3
    mol_edges = model.build_graph(mol_pos)[0]
    zb = torch.cat([mol_z, z])
    posb = torch.cat([mol_pos, pos])
    batch = torch.tensor([0] * 4 + [1] * 4)
    edges_b = torch.cat([mol_edges, edge_index + 4], 1)
    shift_b = torch.cat([torch.zeros(mol_edges.shape[1], 3), offsets @ cell])
    both = scripted(posb, zb, edges_b, shift_b, batch, False)
    mol_ref = energy_forces_stress(model, mol_z, mol_pos)
    assert rel(both["energy"], torch.cat([mol_ref["energy"], ref["energy"]]).detach()) < 1e-12
    assert rel(both["forces"], torch.cat([mol_ref["forces"], ref["forces"]])) < 1e-10


def test_deployed_float32_and_errors():
    model = MODELS["equireann"]()
    model.set_energy_statistics({1: -13.6123456, 6: -1030.0, 8: -2040.0})
    f32 = DeployedPotential(model).float()
    assert f32.atomic_energies.dtype == torch.float64  # totals keep meV precision
    z, pos, cell = small_periodic_system()
    out = torch.jit.script(f32).predict(pos, z, cell)
    ref = energy_forces_stress(model, z, pos, cell=cell)
    assert out["forces"].dtype == torch.float32 and out["energy"].dtype == torch.float64
    assert rel(out["energy"], ref["energy"].detach()) < 1e-7 and rel(out["forces"].double(), ref["forces"]) < 1e-4
    scripted = deploy(model)
    with pytest.raises(Exception, match="atom 1 has atomic number 29, which this model was not trained on"):
        scripted.predict(pos, torch.tensor([8, 29, 1, 6]), cell)
    with pytest.raises(Exception, match="torch.no_grad"):
        with torch.no_grad():
            scripted.predict(pos, z, cell)
    with pytest.raises(ValueError, match="only EquiREANN-family models"):
        DeployedPotential(torch.nn.Linear(3, 1))
