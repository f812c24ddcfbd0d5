"""Checkpoints cannot run code: every loading path reads with ``torch.load(weights_only=True)`` and
instantiates a model config from a file only if its ``_target_``s are allowed model classes.

One real ``equireann-train`` run (in process, ``data=rmd17``) gives the genuine checkpoint; crafted
copies of it carry (a) a pickled object whose unpickling creates a marker file, or (b) only safe data but
a hostile model config (``_target_: torch.load`` of file (a) with ``weights_only: false``, the package's
own loader, ``builtins.open`` nested or in Hydra's ``_args_``, a ``${ckpt_cutoff:(a)}`` interpolation). All
of them created the marker before. Each goes through every entry point: a clear one-line ValueError naming
the file (CLIs: exit code 2), no marker."""
import json

import numpy as np
import pytest
import torch
from ase import Atoms

import pyg_equireann.training.checkpoint as checkpoint_module
from pyg_equireann.deploy.ase import EquiREANNCalculator
from pyg_equireann.training.checkpoint import read_checkpoint, register_model_class
from pyg_equireann.config import ckpt_model_cutoff
from pyg_equireann.cli.evaluate import run as eval_run
from pyg_equireann.cli.export import run as export_run
from pyg_equireann.deploy.export import export
from pyg_equireann.cli.train import run as train_run
from pyg_equireann.training.module import PotentialModule

from .conftest import DATA
from .test_pipeline import TINY, cli, hydra_app

E0 = "++data.atomic_energies={H:-13.6,C:-1029.8,O:-2041.8}"
COMMON = ["data=rmd17", *TINY, "float64=true", "model.num_channels=8", "model.num_radial=8", "model.num_iterations=1",
          "trainer.max_epochs=1"]


class Payload:
    """Unpickling this object creates ``marker`` (what a malicious checkpoint would do with os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The genuine run and the crafted checkpoints; ``files["marker"]`` must never appear."""
    root = tmp_path_factory.mktemp("security")
    run_dir = root / "run"
    # E0 given as a mapping: an OmegaConf DictConfig in the data module's hyperparameters, which the
    # checkpoint must hold as a plain dict (else trainer.test(ckpt_path="best") cannot load it safely)
    hydra_app([*COMMON, E0, f"hydra.run.dir={run_dir}"], train_run)
    genuine = run_dir / "checkpoints" / "best.ckpt"
    marker = root / "MARKER"
    checkpoint = torch.load(genuine, weights_only=True)  # a genuine checkpoint holds no other objects
    config = checkpoint["hyper_parameters"]["model_config"]
    out = {"run": run_dir, "genuine": genuine, "marker": marker}

    def craft(name, model_config=None, **extra):
        crafted = dict(checkpoint, **extra)
        if model_config is not None:
            crafted["hyper_parameters"] = dict(checkpoint["hyper_parameters"], model_config=model_config)
        out[name] = root / f"{name}.ckpt"
        torch.save(crafted, out[name])

    craft("pickled", extra=Payload(marker))
    craft("torch_load", {"_target_": "torch.load", "f": str(out["pickled"]), "weights_only": False})
    craft("own_loader", {"_target_": "pyg_equireann.training.module.PotentialModule.from_checkpoint",
                         "ckpt_path": str(out["pickled"])})
    craft("nested", dict(config, radial={"_target_": "builtins.open", "file": str(marker), "mode": "w"}))
    craft("args", dict(config, _args_=[{"_target_": "builtins.open", "file": str(marker), "mode": "w"}]))
    craft("resolver", dict(config, cutoff=f"${{ckpt_cutoff:'{out['pickled']}'}}"))
    return out


HOSTILE = ["pickled", "torch_load", "own_loader", "nested", "args", "resolver"]
EXPECTED = {"pickled": "contains pickled Python objects that are not allowed",
            "torch_load": "model config entry _target_: 'torch.load' is not an allowed model class",
            "own_loader": "'pyg_equireann.training.module.PotentialModule.from_checkpoint' is not an allowed model class",
            "nested": "model config entry radial._target_: 'builtins.open' is not an allowed model class",
            "args": "model config entry _args_: Hydra's _args_ is not allowed",
            "resolver": "model config entry cutoff: interpolation"}


def ethanol():
    d = np.load(DATA / "rmd17" / "rmd17_ethanol_test_01.npz")
    return Atoms(numbers=d["nuclear_charges"], positions=d["coords"][0])


def calculator_with_suffix(path, tmp_path, suffix):
    copy = tmp_path / f"{path.stem}{suffix}"
    copy.write_bytes(path.read_bytes())
    return EquiREANNCalculator(copy)


ENTRY_POINTS = {
    "read_checkpoint": lambda path, tmp: read_checkpoint(path),
    "from_checkpoint": lambda path, tmp: PotentialModule.from_checkpoint(path),
    "load_from_checkpoint": lambda path, tmp: PotentialModule.load_from_checkpoint(path),
    "ckpt_cutoff": lambda path, tmp: ckpt_model_cutoff(str(path)),
    "calculator.ckpt": lambda path, tmp: EquiREANNCalculator(path),
    "calculator.model": lambda path, tmp: calculator_with_suffix(path, tmp, ".model"),  # not .pt/.ckpt
    "export": lambda path, tmp: export(str(path), str(tmp / "model.pt")),
    "train_run": lambda path, tmp: hydra_app([*COMMON, f"ckpt_path={path}", f"hydra.run.dir={tmp / 'resumed'}"],
                                             train_run),
    "eval_run": lambda path, tmp: hydra_app([f"ckpt_path={path}", "data.num_test=2", "num_threads=1",
                                             f"hydra.run.dir={tmp / 'eval'}"], eval_run, config_name="eval"),
    "export_run": lambda path, tmp: hydra_app([f"ckpt_path={path}", f"out={tmp / 'model.pt'}"], export_run,
                                              config_name="export"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_crafted_checkpoints_run_no_code(files, name, tmp_path):
    """Every crafted file through every in-process entry point (the CLIs' own ``run`` via Hydra)."""
    path = files[name]
    for entry, load in ENTRY_POINTS.items():
        with pytest.raises(ValueError) as err:
            load(path, tmp_path)
        message = str(err.value)
        shown = tmp_path / f"{name}.model" if entry == "calculator.model" else path  # the copy it loaded
        assert str(shown) in message and EXPECTED[name] in message, (entry, message)
        assert "\n" not in message, (entry, message)
        assert not files["marker"].exists(), (entry, name)
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("command,name", [("equireann-train", "pickled"), ("equireann-eval", "torch_load"),
                                          ("equireann-export", "nested")])
def test_cli_refuses_crafted_checkpoint(files, command, name, tmp_path):
    """The real commands: exit code 2, one error line naming the file, no traceback, no marker."""
    args = [*COMMON, f"hydra.run.dir={tmp_path / 'run'}"] if command == "equireann-train" else []
    r = cli(command, *args, f"ckpt_path={files[name]}", cwd=tmp_path, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(files[name]) in errors[0] and EXPECTED[name] in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not files["marker"].exists()


def test_genuine_checkpoint_through_every_entry_point(files, tmp_path):
    """What equireann-train writes loads with weights_only=True and gives the same numbers everywhere."""
    run_dir, genuine = files["run"], files["genuine"]
    for name in ("best.ckpt", "last.ckpt"):
        saved = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert saved["datamodule_hyper_parameters"]["atomic_energies"] == {"H": -13.6, "C": -1029.8, "O": -2041.8}
    assert (run_dir / "test_metrics.json").is_file()  # the final test loaded best.ckpt (weights_only=True)
    atoms = ethanol()
    module = PotentialModule.from_checkpoint(genuine)
    from pyg_equireann import energy_forces_stress

    ref = energy_forces_stress(module.model.double(), torch.tensor(atoms.numbers), torch.tensor(atoms.positions))
    reference = float(ref["energy"][0].detach())
    direct = PotentialModule.load_from_checkpoint(genuine).model.double()
    energy = energy_forces_stress(direct, torch.tensor(atoms.numbers), torch.tensor(atoms.positions))["energy"]
    assert float(energy[0].detach()) == pytest.approx(reference, rel=1e-12)
    assert ckpt_model_cutoff(str(genuine)) == 4.0
    for calc in (EquiREANNCalculator(genuine), calculator_with_suffix(genuine, tmp_path, ".model")):
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(reference, rel=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"].detach().numpy(), atol=1e-8)
    export(str(genuine), str(tmp_path / "model.pt"))  # checks the exported file against the checkpoint
    atoms.calc = EquiREANNCalculator(tmp_path / "model.pt")
    assert atoms.get_potential_energy() == pytest.approx(reference, rel=1e-10)
    # equireann-eval's run on the run's best.ckpt: the numbers of the final test after training
    metrics = hydra_app([f"ckpt_path={genuine}", "data.num_test=10", "num_threads=1", "float64=true",
                         f"hydra.run.dir={tmp_path / 'eval'}"], eval_run, config_name="eval")
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["test/forces_mae"] == pytest.approx(tested["test/forces_mae"], rel=1e-4)
    # resuming (trainer.fit(ckpt_path=..., weights_only=True)) continues from the saved epoch
    last = run_dir / "checkpoints" / "last.ckpt"
    hydra_app([*COMMON[:-1], E0, "trainer.max_epochs=2", "test=false", f"ckpt_path={last}"], train_run)
    assert torch.load(last, weights_only=True)["epoch"] >= 1
    assert not files["marker"].exists()


class OwnModel(torch.nn.Module):
    """A user's model class (not one of the package's)."""

    def __init__(self, cutoff: float = 4.0):
        super().__init__()
        self.cutoff = cutoff


def test_own_model_class_needs_explicit_permission(files, tmp_path, monkeypatch):
    """A model class of one's own is refused until allowed by register_model_class or the environment."""
    checkpoint = torch.load(files["genuine"], weights_only=True)
    target = f"{__name__}.OwnModel"
    checkpoint["hyper_parameters"] = dict(checkpoint["hyper_parameters"], model_config={"_target_": target})
    path = tmp_path / "own.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=rf"{target}' is not an allowed model class.*register_model_class"):
        read_checkpoint(path)
    monkeypatch.setenv("PYG_EQUIREANN_ALLOWED_MODELS", f"other.Model, {target}")
    assert read_checkpoint(path)["hyper_parameters"]["model_config"]["_target_"] == target
    monkeypatch.delenv("PYG_EQUIREANN_ALLOWED_MODELS")
    monkeypatch.setattr(checkpoint_module, "_ALLOWED_TARGETS", set(checkpoint_module._ALLOWED_TARGETS))
    assert register_model_class(OwnModel) is OwnModel
    assert read_checkpoint(path)["hyper_parameters"]["model_config"]["_target_"] == target


def test_refused_even_when_torch_is_told_to_unpickle(files, monkeypatch):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (set for libraries that need it) turns torch.load's default
    into weights_only=False; every load here passes weights_only=True explicitly, which it cannot override."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for load in (read_checkpoint, PotentialModule.from_checkpoint, PotentialModule.load_from_checkpoint):
        with pytest.raises(ValueError, match="contains pickled Python objects that are not allowed"):
            load(files["pickled"])
    assert not files["marker"].exists()


def test_hostile_run_folder_config_is_refused(files, tmp_path):
    """Resuming reuses the run folder's recorded config, so that record is as untrusted as the checkpoint:
    a callback ``_target_`` that the package's configs do not name is refused (the run's own checkpoint is
    genuine), unless the command line repeats it."""
    import shutil

    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    shutil.copytree(files["run"], run_dir)
    record = run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.load(record)
    config.callbacks.evil = {"_target_": "builtins.open", "file": str(files["marker"]), "mode": "w"}
    OmegaConf.save(config, record)
    with pytest.raises(ValueError, match=r"callbacks\.evil\._target_=builtins\.open.*repeat these overrides") as err:
        hydra_app([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], train_run)
    assert str(run_dir) in str(err.value) and "\n" not in str(err.value)
    assert not files["marker"].exists()
