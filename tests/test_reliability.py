"""Reliability: bad input gives errors naming the problem, interrupted training loses nothing, runs are
reproducible (docs/reliability.md). Real files, real Lightning trainers and real ``equireann-train``
processes (killed with SIGKILL); complements the input checks in ``test_datamodules.py``."""
import copy
import json
import re
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ase
import ase.io
import lightning as L
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import Hartree, kcal, mol
from omegaconf import OmegaConf
from torch_geometric.data import Batch

import pyg_equireann.datamodules
from pyg_equireann.datamodules import XYZDataModule
from pyg_equireann import REANN, EquiREANN, energy_forces_stress
from pyg_equireann.training.checkpoint import AtomicCheckpointIO, atomic_torch_save
from pyg_equireann.training.evaluation import check_elements
from pyg_equireann.training.prepare import prepare_model_config
from pyg_equireann.cli.train import run as train_run
from pyg_equireann.training.module import PotentialModule
from pyg_equireann.models.referenced import ReferencedModel
from pyg_equireann.utils import environment_info, git_state

from .conftest import DATA, load_rmd17, make_model
from .test_datamodules import write_molecules
from .test_pipeline import TINY, cli, ethanol_datamodule, hydra_app, make_module

KW = dict(val_fraction=0.0, progress=False, cache=False)
GOOD = (
    "2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc=\"F F F\"\n"
    "H 0 0 0 0.1 0 0\nO 0 0 1 -0.1 0 0\n"
)


def write(path, text):
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- 1. bad data files


@pytest.mark.parametrize("what,bad,message", [
    ("positions", GOOD.replace("O 0 0 1", "O 0 inf 1"), r"bad\.xyz: frame 2: positions of atom 1 contains a non-finite"),
    ("energy", GOOD.replace("energy=-1.0", "energy=-inf"), r"bad\.xyz: frame 2: energy key 'energy' contains a non-finite"),
    ("forces", GOOD.replace("-0.1 0 0", "-0.1 inf 0"), r"bad\.xyz: frame 2: forces key 'forces' of atom 1 contains a non-finite"),
])
def test_infinite_values_in_file(tmp_path, what, bad, message):
    path = write(tmp_path / "bad.xyz", GOOD * 2 + bad)
    with pytest.raises(ValueError, match=message):
        XYZDataModule(path, **KW).setup()


def test_blank_file_and_misspelt_keys(tmp_path):
    with pytest.raises(ValueError, match=r"blank\.xyz"):
        XYZDataModule(write(tmp_path / "blank.xyz", "\n\n"), **KW).setup()
    good = write(tmp_path / "good.xyz", GOOD * 3)
    with pytest.raises(KeyError) as err:
        XYZDataModule(good, energy_key="enrgy", **KW).setup()
    assert "good.xyz: frame 0: no energy under key 'enrgy'" in str(err.value)
    assert "Did you mean 'energy'?" in str(err.value)
    with pytest.raises(KeyError) as err:
        XYZDataModule(good, forces_key="force", **KW).setup()
    assert "good.xyz" in str(err.value) and "'force'" in str(err.value)
    assert "Did you mean forces_key='forces'?" in str(err.value)


def test_overlapping_atoms_in_file(tmp_path):
    dup = GOOD.replace("2\n", "3\n", 1).replace("O 0 0 1 -0.1 0 0\n", "O 0 0 1 -0.1 0 0\nH 0 0 1.001 0 0 0\n")
    path = write(tmp_path / "dup.xyz", GOOD + dup)
    with pytest.raises(ValueError, match=r"dup\.xyz: frame 1: atom 1 \(O\) and atom 2 are 0\.001 Å apart"):
        XYZDataModule(path, **KW).setup()
    # periodic: an atom on top of a periodic image of another one
    cell = "3\nLattice=\"2 0 0 0 2 0 0 0 2\" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc=\"T T T\"\n"
    path = write(tmp_path / "image.xyz", cell + "H 0 0 0 0 0 0\nH 1 1 1 0 0 0\nH 2 0 0.002 0 0 0\n")
    with pytest.raises(ValueError, match=r"image\.xyz: frame 0: atom \d \(H\) and a periodic image of atom \d are 0\.002 Å"):
        XYZDataModule(path, cutoff=1.5, **KW).setup()


KCAL = kcal / mol  # eV
#: rMD17 ethanol training frame 3 and its four nearest frames (superposed): 5+ close pairs among 5 frames.
ETHANOL_CLOSE = [3, 37, 753, 962, 992]


def _rescaled(frames, dst, energy=1.0, forces=1.0):
    """``frames`` (ASE atoms with energies/forces) written to extxyz with both multiplied (a unit mix-up)."""
    for a in frames:
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy() * energy, forces=a.get_forces() * forces)
    ase.io.write(dst, frames, format="extxyz")
    return dst


def _rmd17_atoms(molecule, frames):
    z, pos, e, f = load_rmd17(molecule, frames)
    atoms = []
    for k in range(len(e)):
        a = ase.Atoms(numbers=z.numpy(), positions=pos[k].numpy())
        a.calc = SinglePointCalculator(a, energy=float(e[k]), forces=f[k].numpy())
        atoms.append(a)
    return atoms


def _setup_issues(dm):
    """Unit messages of ``dm.setup()`` (warnings) or its ValueError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dm.setup()
        except ValueError as error:
            return [w for w in caught if "units" in str(w.message)], str(error)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "unit" in str(w.message)], None


def test_unit_mixup_stops_training(tmp_path):
    """Energies in Hartree or kcal/mol with forces in eV/Å: a one-line error naming the file, the measured
    ratio of energy changes to the work of the forces between nearby frames, the likely mix-up and the way
    out; ``check_units=warn`` warns instead, ``check_units=false`` is silent."""
    hartree = _rescaled(ase.io.read(DATA / "acac" / "train_300K.xyz", ":150"), tmp_path / "acac_hartree.xyz",
                        energy=1 / Hartree)
    with pytest.raises(ValueError) as err:
        XYZDataModule(hartree, **KW).setup()
    message = str(err.value)
    assert message.startswith(f"{hartree}: energies and forces have inconsistent units: between ") and "\n" not in message
    assert re.search(r"the energy changes are 0\.0[2-5]\d* times the work of the forces .*energies in Hartree with "
                     r"forces in eV/Å give 0\.0367.*check_units=warn", message), message
    with pytest.warns(UserWarning, match=r"acac_hartree\.xyz: energies and forces have inconsistent units"):
        XYZDataModule(hartree, check_units="warn", **KW).setup()
    assert _setup_issues(XYZDataModule(hartree, check_units=False, **KW)) == ([], None)
    with pytest.raises(ValueError, match="check_units must be true, false or warn, got 'maybe'"):
        XYZDataModule(hartree, check_units="maybe", **KW)
    # with isolated-atom energies in eV the binding-energy check speaks as well
    issues, error = _setup_issues(XYZDataModule(hartree, atomic_energies=DATA / "acac" / "isolated_atoms.xyz",
                                                check_units="warn", **KW))
    assert error is None and any("acac_hartree.xyz: frame" in m and "eV/atom; binding energies" in m for m in issues)

    # rMD17 ethanol (30 frames) with energies in kcal/mol and forces in eV/Å: as extxyz ...
    kcal_xyz = _rescaled(_rmd17_atoms("ethanol", slice(0, 30)), tmp_path / "ethanol_kcal.xyz", energy=1 / KCAL)
    with pytest.raises(ValueError, match=r"ethanol_kcal\.xyz: energies and forces have inconsistent units: .* are "
                       r"2\d\.?\d* times the work .*energies in kcal/mol with forces in eV/Å give 23\.1"):
        XYZDataModule(kcal_xyz, **KW).setup()
    # ... and as an rMD17 npz file whose forces are in eV/Å (the module converts both from kcal/mol)
    raw = dict(np.load(DATA / "rmd17" / "rmd17_ethanol_train_01.npz"))
    raw = {k: v if k == "nuclear_charges" else v[:30] for k, v in raw.items()}
    (tmp_path / "rmd17").mkdir()
    np.savez(tmp_path / "rmd17" / "rmd17_ethanol_test_01.npz", **raw)
    np.savez(tmp_path / "rmd17" / "rmd17_ethanol_train_01.npz", **dict(raw, forces=raw["forces"] * KCAL))
    dm = pyg_equireann.datamodules.MD17DataModule(molecule="ethanol", root=tmp_path, num_train=25, num_val=5, download=False,
                                    progress=False, cache=False)
    with pytest.raises(ValueError, match=r"rmd17_ethanol_train_01\.npz: energies and forces have inconsistent units"):
        dm.setup()


def test_unit_mixup_few_frames(tmp_path):
    """Five frames of one molecule with energies in Hartree: an error when three pairs of nearby frames show
    it, a warning when the frames are far apart (only the energy-fluctuation length shows it). The same
    frames in eV pass silently."""
    close = _rmd17_atoms("ethanol", ETHANOL_CLOSE)
    far = _rmd17_atoms("aspirin", slice(0, 5))
    for frames, name in ((close, "close"), (far, "far")):
        assert _setup_issues(XYZDataModule(_rescaled(frames, tmp_path / f"{name}_ev.xyz"), **KW)) == ([], None)
    issues, error = _setup_issues(XYZDataModule(_rescaled(close, tmp_path / "close.xyz", 1 / Hartree), **KW))
    assert error is not None and re.search(r"close\.xyz: energies and forces have inconsistent units: between "
                                           r"([5-9]|10) pairs.*Hartree", error), (issues, error)
    issues, error = _setup_issues(XYZDataModule(_rescaled(far, tmp_path / "far.xyz", 1 / Hartree), **KW))
    assert error is None and len(issues) == 1, issues
    assert re.search(r"far\.xyz: energies vary little for the size of the forces \(energy fluctuation / force = "
                     r"0\.00\d+ Å over 5 frames.*Hartree", issues[0]), issues


def test_unit_mixup_without_frame_pairs(tmp_path):
    """Periodic frames of different cells (no pairs to compare): kcal/mol energies with eV/Å forces make the
    energy-fluctuation length 23x too large, a warning; in eV the set passes."""
    frames = ase.io.read(DATA / "cu_emt" / "train.xyz", ":")
    issues, error = _setup_issues(XYZDataModule(_rescaled(frames, tmp_path / "cu_kcal.xyz", 1 / KCAL), **KW))
    assert error is None and len(issues) == 1 and re.search(
        r"cu_kcal\.xyz: energies vary much for the size of the forces \(energy fluctuation / force = [3-9]\.\d+ Å", issues[0])


def test_shipped_data_pass_unit_check():
    """Every shipped data set in its own units: no unit warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for dm in (pyg_equireann.datamodules.acac_datamodule(num_train=200, num_val=20, num_test=5, progress=False),
                   pyg_equireann.datamodules.cumulene_datamodule(num_train=200, num_val=20, num_test=5, progress=False),
                   XYZDataModule(DATA / "cu_emt" / "train.xyz", progress=False),
                   ethanol_datamodule(num_train=200),
                   ethanol_datamodule(molecule="aspirin", num_train=20),
                   ethanol_datamodule(molecule="malonaldehyde", num_train=20)):
            dm.setup()


# --------------------------------------------------------------------------- 2. bad input at call time


def test_model_rejects_nonfinite_and_overlapping_atoms():
    model = make_model(EquiREANN, elements=[1, 6, 8], num_channels=8)
    z = torch.tensor([8, 1, 1, 6, 1])
    pos = torch.tensor([[0.0, 0, 0], [0.96, 0, 0], [-0.2, 0.93, 0], [5.0, 0, 0], [6.0, 0, 0]])
    batch = torch.tensor([0, 0, 0, 1, 1])
    for value in (float("nan"), float("inf")):
        bad = pos.clone()
        bad[4, 1] = value
        text = r"atom 1 of structure 1 \(atom 4 of the batch\) has a non-finite position"
        with pytest.raises(ValueError, match=text):
            model(z, bad, batch)  # found by the neighbour search, with the text of the model's check
        # with a precomputed neighbour list (as in training), by the model
        edge_index, _ = model.build_graph(pos, batch)
        with pytest.raises(ValueError, match=text):
            energy_forces_stress(model, z, bad, batch, edge_index=edge_index)
    for d in (0.0, 1e-9, 0.005):
        close = pos.clone()
        close[2] = close[1] + torch.tensor([0.0, 0.0, d])
        with pytest.raises(ValueError, match=r"atom [12] and atom [12] of structure 0 \(atoms [12] and [12] of the batch\) are .* Å apart \(closer than 0\.01 Å\)"):
            energy_forces_stress(model, z, close, batch)
    # just above the limit: finite energy and forces in float64 and float32
    close = pos.clone()
    close[2] = close[1] + torch.tensor([0.0, 0.0, 0.02])
    for m, p in ((model, close), (copy.deepcopy(model).float(), close.float())):
        out = energy_forces_stress(m, z, p, batch)
        assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    with pytest.raises(ValueError, match="atom 1 is element N"):
        model(torch.tensor([8, 7]), pos[:2])
    cell = torch.eye(3) * 3.0
    cell[1, 1] = float("nan")
    with pytest.raises(ValueError, match="cell contains non-finite"):
        model(z[:3], pos[:3], cell=cell)


def test_referenced_model_rejects_unseen_element_and_nan():
    from torch_geometric.nn.models import SchNet

    from pyg_equireann.models.pyg import RadiusInteractionGraph

    schnet = SchNet(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=8,
                    interaction_graph=RadiusInteractionGraph(5.0))
    model = ReferencedModel(schnet).double()
    z, pos = torch.tensor([8, 1, 1]), torch.tensor([[0.0, 0, 0], [0.96, 0, 0], [-0.2, 0.93, 0]])
    model(torch.tensor([7, 1, 1]), pos)  # no reference energies yet: any element
    model.set_energy_statistics({1: -13.6, 8: -2040.0})
    assert torch.isfinite(model(z, pos)).all()
    with pytest.raises(ValueError, match=r"atom 0 is element N \(Z=7\), which this model was not built for; model elements: \['H', 'O'\]"):
        model(torch.tensor([7, 1, 1]), pos)
    bad = pos.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="atom 2 has a non-finite position"):
        model(z, bad)


@pytest.mark.parametrize("cls", [EquiREANN, REANN])
def test_isolated_atoms_get_their_reference_energy(cls):
    """A single atom, and atoms without neighbours within the cutoff, have finite energies
    E0[Z] + s·Φ_Z(0) + b (element-specific through E0, and Φ_Z for per-element readouts) and zero forces."""
    model = make_model(cls, elements=[1, 6, 8], num_channels=8)
    e0 = {1: -13.6, 6: -1030.0, 8: -2040.0}
    model.set_energy_statistics(e0, scale=0.5, shift=-0.3)
    slot = {1: 0, 6: 1, 8: 2}
    single = {}
    for z in e0:
        out = energy_forces_stress(model, torch.tensor([z]), torch.zeros(1, 3))
        readout = model.readout(torch.zeros(1, model.num_channels), torch.tensor([slot[z]])).item()
        assert out["energy"].item() == pytest.approx(e0[z] + 0.5 * readout - 0.3, rel=1e-12)
        assert torch.equal(out["forces"], torch.zeros(1, 3))
        single[z] = out["energy"].item()
    assert len({round(v, 6) for v in single.values()}) == 3
    z = torch.tensor([8, 1, 6, 1])
    far = 10.0 * torch.arange(4.0).unsqueeze(1).expand(4, 3)  # 17 Å apart, cutoff 4 Å
    out = energy_forces_stress(model, z, far)
    assert out["energy"].item() == pytest.approx(sum(single[int(a)] for a in z), rel=1e-12)
    assert torch.equal(out["forces"], torch.zeros(4, 3))
    # periodic box larger than the cutoff with one atom: no neighbour, not even its own image
    out = energy_forces_stress(model, torch.tensor([6]), torch.zeros(1, 3), cell=9.0 * torch.eye(3), compute_stress=True)
    assert out["energy"].item() == pytest.approx(single[6], rel=1e-12)
    assert torch.equal(out["stress"], torch.zeros(1, 3, 3))


def test_nonfinite_targets_and_predictions_in_training():
    """A batch whose targets hold NaN/inf raises ValueError naming the frame (and atom); a model that
    diverged raises FloatingPointError instead of training on NaN."""
    dm = ethanol_datamodule(cache=False)
    model = dict(_target_="pyg_equireann.EquiREANN", cutoff=4.0, num_channels=8, elements="auto",
                 avg_num_neighbors="auto")
    module = make_module(prepare_model_config(OmegaConf.create(model), dm), dm)
    data = [dm.train_dataset[k] for k in range(3)]
    frames = [int(d.idx) for d in data]

    def check(batch):
        out = module.predict_batch(batch, create_graph=False)
        loss, _ = module._loss_and_errors(batch, out)
        module.check_finite(batch, out, loss)

    check(Batch.from_data_list(data))
    bad = [d.clone() for d in data]
    bad[1].energy = torch.tensor([float("nan")], dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"target energy of frame {frames[1]} is NaN or inf"):
        check(Batch.from_data_list(bad))
    bad = [d.clone() for d in data]
    bad[2].forces = bad[2].forces.clone()
    bad[2].forces[4, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"target forces of frame {frames[2]}, atom 4 is NaN or inf"):
        check(Batch.from_data_list(bad))
    with torch.no_grad():
        next(module.model.readout.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=rf"predicted energy is NaN or inf for frame {frames[0]}: training diverged"):
        check(Batch.from_data_list(data))


def test_eval_rejects_test_set_with_unseen_element(tmp_path):
    dm = ethanol_datamodule(cache=False)
    model = dict(_target_="pyg_equireann.EquiREANN", cutoff=4.0, num_channels=8, elements="auto",
                 avg_num_neighbors="auto")
    module = make_module(prepare_model_config(OmegaConf.create(model), dm), dm)
    write_molecules(tmp_path / "train.xyz", 10, symbols_pool=("H", "C", "N"))
    write_molecules(tmp_path / "nitro.xyz", 3, seed=1, symbols_pool=("H", "N"))
    test_dm = XYZDataModule(tmp_path / "train.xyz", test_files={"nitro": tmp_path / "nitro.xyz"}, cutoff=4.0, **KW)
    test_dm.setup("test")
    with pytest.raises(ValueError) as err:
        check_elements(module, test_dm, "model.ckpt")
    msg = str(err.value)
    assert "'nitro'" in msg and "nitro.xyz" in msg and "N, Z=7, in frame 0" in msg and "['H', 'C', 'O']" in msg


# --------------------------------------------------------------------------- 3. checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: 1 epoch of EquiREANN (8 channels) on 20 ethanol frames."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dm = ethanol_datamodule(cache=False)
        model = dict(_target_="pyg_equireann.EquiREANN", cutoff=4.0, num_channels=8, elements="auto",
                     avg_num_neighbors="auto")
        config = prepare_model_config(OmegaConf.create(model), dm)
        module = make_module(config, dm)
        trainer = L.Trainer(max_epochs=1, inference_mode=False, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()])
        trainer.fit(module, datamodule=dm)
        path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
        trainer.save_checkpoint(path)
    finally:
        torch.set_default_dtype(previous)
    return path, config


def test_corrupt_checkpoints_raise_clear_errors(checkpoint, tmp_path):
    path, config = checkpoint
    PotentialModule.from_checkpoint(path, model_config=config)  # the good file loads
    data = path.read_bytes()
    cases = {"truncated.ckpt": data[: len(data) // 2], "empty.ckpt": b"", "garbage.ckpt": os.urandom(4096),
             "flipped.ckpt": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:]}
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}: (cannot read the checkpoint|checkpoint file is empty)"):
            PotentialModule.from_checkpoint(bad)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt is not a pyg_equireann training checkpoint"):
        PotentialModule.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.ckpt"):
        PotentialModule.from_checkpoint(tmp_path / "missing.ckpt")
    # the CLI reports it with exit code 2 and no traceback
    r = cli("equireann-eval", f"ckpt_path={tmp_path / 'truncated.ckpt'}", cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "truncated.ckpt: cannot read the checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_of_another_model(checkpoint, tmp_path):
    path, config = checkpoint
    other = dict(config, num_channels=16, cutoff=5.0, max_l=3)
    with pytest.raises(ValueError) as err:
        PotentialModule.from_checkpoint(path, model_config=other)
    msg = str(err.value)
    assert str(path) in msg and "model.num_channels: checkpoint 8, requested 16" in msg
    assert "model.cutoff: checkpoint 4.0, requested 5.0" in msg and "model.max_l: checkpoint (not set), requested 3" in msg
    reann = dict(config, _target_="pyg_equireann.REANN")
    with pytest.raises(ValueError, match=r"model\._target_: checkpoint 'pyg_equireann.EquiREANN', requested 'pyg_equireann.REANN'"):
        PotentialModule.from_checkpoint(path, model_config=reann)


def test_resume_with_another_model_is_refused(checkpoint, tmp_path):
    """``equireann-train ckpt_path=... model.num_channels=16`` on an 8-channel checkpoint: exit code 2
    and the differing settings, not Lightning's state-dict size-mismatch traceback."""
    path, _ = checkpoint
    r = cli("equireann-train", *TINY, "model.num_channels=16", "float64=true", f"ckpt_path={path}",
            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "holds a different model than the one asked for" in r.stderr
    assert "model.num_channels: checkpoint 8, requested 16" in r.stderr and "Traceback" not in r.stderr


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("serialisation failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _write_forever(path, pipe):
    io = AtomicCheckpointIO()
    payload = torch.arange(250_000, dtype=torch.float64)  # 2 MB
    k = 0
    while True:
        k += 1
        io.save_checkpoint({"k": k, "payload": payload + k}, path)
        pipe.send(k)


def test_checkpoint_survives_sigkill_during_writes(tmp_path):
    """A process that saves 2 MB checkpoints in a loop (most of its time is spent writing and fsyncing)
    is killed with SIGKILL 5 times: the file always loads and is complete, also when the kill
    interrupted a save (its temporary file is left; the next save removes it)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the child inherits the imports: fast to start
    path = tmp_path / "ckpt" / "last.ckpt"
    interrupted = 0
    for trial in range(5):
        receiver, sender = context.Pipe(duplex=False)
        proc = context.Process(target=_write_forever, args=(path, sender), daemon=True)
        proc.start()
        saves = [receiver.recv(), receiver.recv()]  # two complete saves: the loop is running
        time.sleep(0.01 + 0.02 * trial)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        while receiver.poll():
            saves.append(receiver.recv())
        assert proc.exitcode == -signal.SIGKILL
        checkpoint = torch.load(path, weights_only=True)
        k = checkpoint["k"]  # the last completed save (reported, or renamed just before the kill)
        assert k in (saves[-1], saves[-1] + 1)
        assert torch.equal(checkpoint["payload"], torch.arange(250_000, dtype=torch.float64) + k)
        interrupted += len(list(path.parent.glob(".last.ckpt.*.tmp")))
    assert interrupted >= 1  # some kills hit a save in progress
    AtomicCheckpointIO().save_checkpoint({"k": 0}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------- 4. SIGKILL mid-training
# test_resume.py::test_sigkill_mid_epoch_then_resume_equals_uninterrupted (the run of `make train`, resumed
# with ckpt_path= alone)


# --------------------------------------------------------------------------- 5. reproducibility


def test_same_seed_same_metrics_and_run_info(tmp_path):
    """Two runs with the same seed and config (float32, CPU) write byte-identical metrics; another seed
    does not. The run folder records versions, git commit and the resolved config."""
    torch.set_default_dtype(torch.float32)  # as in a fresh process (conftest sets float64)
    common = [*TINY, "model.num_channels=8", "model.num_radial=8", "trainer.max_epochs=2", "data.batch_size=5",
              "trainer.deterministic=true"]
    runs = {name: tmp_path / name for name in ("a", "b", "c")}
    for name, run_dir in runs.items():
        hydra_app([*common, f"seed={7 if name != 'c' else 8}", f"hydra.run.dir={run_dir}"], train_run)
    text = {name: (d / "logs" / "metrics.csv").read_text() for name, d in runs.items()}
    assert text["a"] == text["b"] and text["a"] != text["c"]
    assert (runs["a"] / "test_metrics.json").read_text() == (runs["b"] / "test_metrics.json").read_text()

    info = json.loads((runs["a"] / "run_info.json").read_text())
    assert info["seed"] == 7 and info["config"] == "config_resolved.yaml" and (runs["a"] / "config_resolved.yaml").is_file()
    assert OmegaConf.load(runs["a"] / "config_resolved.yaml").seed == 7
    for name in ("torch", "torch_geometric", "lightning", "hydra-core", "ase", "numpy", "pyg_equireann"):
        assert info["packages"][name], name
    assert info["packages"]["torch"] == torch.__version__ and info["python"] == sys.version.split()[0]
    assert info["torch"]["deterministic_algorithms"] is True
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and Path(subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                                                    capture_output=True, text=True).stdout.strip()) == root:
        assert info["git"]["commit"] == head.stdout.strip()
    else:
        assert info["git"] is None


def test_git_state_without_repository_or_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) is None  # not a repository
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    (tmp_path / "repo" / "sub").mkdir()
    assert git_state(tmp_path / "repo") is None  # no commit yet
    assert git_state(tmp_path / "repo" / "sub") is None  # inside another repository
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no git executable
    assert git_state(Path(__file__).resolve().parents[1]) is None
    assert environment_info()["git"] is None
