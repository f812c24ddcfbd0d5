"""Training on one's own extxyz files (``data=xyz``), as a MACE user does first: several test sets through
train → final test → resume, evaluation from a checkpoint and test files alone, test sets selected by an
info field or read with their own energy key, test metrics per ``config_type``, the split keys of
``conf/data/xyz.yaml`` and stress in the loss by default. Small files written from the shipped acac and
cu_emt data; real Hydra composition, real Lightning trainers and the real CLIs (where their exit code
and output are what is tested)."""
import json
import logging
import math
from pathlib import Path

import ase.io
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import pyg_equireann.datamodules
from pyg_equireann.datamodules import XYZDataModule
from pyg_equireann.cli import CONF_DIR, user_errors
from pyg_equireann.cli.evaluate import run as eval_run
from pyg_equireann.training.module import AUTO_STRESS_WEIGHT, PotentialModule

from .test_pipeline import cli, hydra_app, read_csv

DATA = Path(__file__).resolve().parents[1] / "data"
ACAC = DATA / "acac"
QUIET = ["trainer.enable_progress_bar=false", "num_threads=1", "model.num_channels=8", "model.num_radial=8"]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def equireann_eval(*overrides):
    """``equireann-eval`` in this process (Hydra composition, run folder and job logging as the CLI)."""
    def task(cfg):
        with user_errors():
            return eval_run(cfg)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as in the CLI process (conftest sets float64)
    try:
        return hydra_app(list(overrides), task, config_name="eval")
    finally:
        torch.set_default_dtype(previous)


def _energy(atoms) -> float:
    return float(atoms.info["energy"]) if "energy" in atoms.info else float(atoms.get_potential_energy())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``train.xyz`` (30 acac frames at 300 K); ``mixed.xyz``: 4 + 4 test frames with ``config_type``
    300K_MD and 600K_MD; ``dihedral.xyz``: 4 scan frames (energies only); ``scan.xyz``: the same frames
    with the energy under ``E_dft`` instead of ``energy``."""
    d = tmp_path_factory.mktemp("own_data")
    ase.io.write(d / "train.xyz", ase.io.read(ACAC / "train_300K.xyz", index=":30"), format="extxyz")
    mixed = ase.io.read(ACAC / "test_MD_300K.xyz", index=":4") + ase.io.read(ACAC / "test_MD_600K.xyz", index=":4")
    assert [a.info["config_type"] for a in mixed] == ["300K_MD"] * 4 + ["600K_MD"] * 4
    ase.io.write(d / "mixed.xyz", mixed, format="extxyz")
    scan = ase.io.read(ACAC / "test_dihedral.xyz", index=":4")
    ase.io.write(d / "dihedral.xyz", scan, format="extxyz")
    for atoms in scan:
        atoms.info["E_dft"] = _energy(atoms)
        atoms.info.pop("energy", None)
        atoms.calc = None
    ase.io.write(d / "scan.xyz", scan, format="extxyz")
    return d


def data_args(d: Path):
    return ["data=xyz", f"data.train_file={d / 'train.xyz'}", f"data.atomic_energies={ACAC / 'isolated_atoms.xyz'}",
            # the split keys exist in conf/data/xyz.yaml: no '+' needed
            "data.num_train=20", "data.num_val=5", "data.batch_size=5",
            f"data.test_files=[{d / 'mixed.xyz'},{d / 'dihedral.xyz'}]"]


@pytest.fixture(scope="module")
def acac_run(files):
    """One ``equireann-train`` run (1 epoch) with two test files given as a list."""
    run_dir = files / "run"
    r = cli("equireann-train", *data_args(files), *QUIET, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
            cwd=files)
    return run_dir, r


# --------------------------------------------------------------------------- item 9: several test files


def test_train_with_several_test_files_tests_each_and_per_config_type(acac_run):
    """Before: the final test crashed loading best.ckpt (OmegaConf ListConfig in the data module's
    hyperparameters, refused by torch.load(weights_only=True)): exit 1, no test_metrics.json."""
    run_dir, r = acac_run
    assert r.returncode == 0, r.stderr[-3000:]
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    for name in ("mixed", "dihedral"):
        assert math.isfinite(tested[f"test/{name}/energy_mae"]) and tested[f"test/{name}/energy_mae"] > 0
    assert "test/dihedral/forces_mae" not in tested  # the scan has energies only
    # mixed.xyz holds two config types: reported each; 4 frames of 15 atoms each, so the set's MAEs are their means
    per_type = {t: tested[f"test/mixed/config_type={t}/forces_mae"] for t in ("300K_MD", "600K_MD")}
    assert tested["test/mixed/forces_mae"] == pytest.approx(sum(per_type.values()) / 2, rel=1e-5)
    e_types = [tested[f"test/mixed/config_type={t}/energy_mae"] for t in ("300K_MD", "600K_MD")]
    assert tested["test/mixed/energy_mae"] == pytest.approx(sum(e_types) / 2, rel=1e-5)
    assert not any("dihedral/config_type=" in k for k in tested)  # one config type: no breakdown
    assert "| test/mixed/config_type=600K_MD/forces_mae |" in r.stdout
    # the checkpoints hold plain Python hyperparameters and load without unpickling code
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["datamodule_hyper_parameters"]
    assert hp["test_files"] == [str(run_dir.parent / "mixed.xyz"), str(run_dir.parent / "dihedral.xyz")]
    assert hp["num_train"] == 20 and hp["config_type_key"] == "config_type"


def test_resume_with_several_test_files(acac_run, files):
    """Resuming the run (same data, more epochs) trains on and tests every set again."""
    run_dir, first = acac_run
    assert first.returncode == 0, first.stderr[-3000:]
    r = cli("equireann-train", *data_args(files), *QUIET, "trainer.max_epochs=2",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", cwd=files)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "train_summary.json").read_text())["epochs"] == 2
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    assert {"test/mixed/forces_mae", "test/dihedral/energy_mae", "test/mixed/config_type=300K_MD/energy_mae"} <= set(tested)


# --------------------------------------------------------------------------- items 10, 12: evaluation


def test_eval_needs_only_checkpoint_and_test_files(acac_run, files):
    """Before: without data.train_file, MissingMandatoryValue and a 25-line traceback. Test sets given as
    a path, as frames selected by config_type and as a file with the energy under another key."""
    run_dir, r = acac_run
    assert r.returncode == 0, r.stderr[-3000:]
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    d = files
    spec = (f"data.test_files={{mixed:{d / 'mixed.xyz'},md600:{{path:{d / 'mixed.xyz'},select:{{config_type:'600K_MD'}}}},"
            f"scan:{{path:{d / 'scan.xyz'},energy_key:E_dft}}}}")
    before = set((run_dir / "eval").glob("*")) if (run_dir / "eval").exists() else set()
    returned = equireann_eval(f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "data=xyz", spec, "num_threads=1")
    (eval_dir,) = set((run_dir / "eval").glob("xyz_*")) - before
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert returned == pytest.approx(metrics)
    # the same checkpoint and frames as the final test of training
    assert metrics["mixed/forces_mae"] == pytest.approx(tested["test/mixed/forces_mae"], rel=1e-4)
    assert metrics["mixed/config_type=600K_MD/forces_mae"] == pytest.approx(
        tested["test/mixed/config_type=600K_MD/forces_mae"], rel=1e-4)
    # E_dft holds the energies that dihedral.xyz stores under 'energy'
    assert metrics["scan/energy_mae"] == pytest.approx(tested["test/dihedral/energy_mae"], rel=1e-4)
    # the frames selected by config_type are the config type's share of the mixed set
    for key in ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse"):
        assert metrics[f"md600/{key}"] == pytest.approx(metrics[f"mixed/config_type=600K_MD/{key}"], rel=1e-9)
    rows = read_csv(eval_dir / "errors.csv")
    assert [(row["set"], row["frame"], row["config_type"]) for row in rows if row["set"] != "scan"] == (
        [("mixed", str(k), "300K_MD" if k < 4 else "600K_MD") for k in range(8)]
        + [("md600", str(k), "600K_MD") for k in range(4, 8)])
    scan_ref = [_energy(a) for a in ase.io.read(ACAC / "test_dihedral.xyz", index=":4")]
    assert [float(row["energy_ref_eV"]) for row in rows if row["set"] == "scan"] == pytest.approx(scan_ref, abs=1e-7)
    assert {row["config_type"] for row in rows if row["set"] == "scan"} == {"dihedral_scan"}


@pytest.mark.parametrize("test_files, message", [
    (None, "neither data.train_file nor data.test_files is set: nothing to evaluate"),
    ("[{d}/missing.xyz]", "structure file not found: {d}/missing.xyz"),
    ("{{x:{{path:{d}/mixed.xyz,selct:{{config_type:md}}}}}}", "test set 'x': unknown setting(s) ['selct']; allowed: "
     "['path', 'select', 'energy_key', 'forces_key', 'stress_key', 'format']"),
])
def test_failed_eval_says_why_in_one_line_and_leaves_no_folder(acac_run, files, capsys, monkeypatch, test_files, message):
    """Before: ``data=xyz`` without train_file gave MissingMandatoryValue and a 25-line traceback, a bad
    test-set setting Hydra's wrapped InstantiationException; each left an empty eval folder."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir, r = acac_run
    assert r.returncode == 0, r.stderr[-3000:]
    before = sorted((run_dir / "eval").glob("*")) if (run_dir / "eval").exists() else []
    overrides = [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "data=xyz", "num_threads=1"]
    if test_files:
        overrides.append("data.test_files=" + test_files.format(d=files))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        equireann_eval(*overrides)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == "error: " + message.format(d=files)
    after = sorted((run_dir / "eval").glob("*")) if (run_dir / "eval").exists() else []
    assert after == before


def test_test_only_datamodule_errors(files):
    with pytest.raises(ValueError, match="neither data.train_file nor data.test_files"):
        XYZDataModule(progress=False).setup("test")
    with pytest.raises(ValueError, match="data.train_file is not set: training needs a training file"):
        XYZDataModule(test_files=files / "mixed.xyz", progress=False).setup("fit")


# --------------------------------------------------------------------------- item 12: test-set forms


def test_test_sets_by_info_field_and_own_keys(files):
    dm = XYZDataModule(
        files / "train.xyz", val_fraction=0.2, progress=False, cutoff=4.0,
        test_files={"all": files / "mixed.xyz",
                    "md300": {"path": files / "mixed.xyz", "select": {"config_type": "300K_MD"}},
                    "both": {"path": str(files / "mixed.xyz"), "select": {"config_type": ["300K_MD", "600K_MD"]}},
                    "scan": {"path": files / "scan.xyz", "energy_key": "E_dft", "forces_key": None}})
    dm.setup("fit")
    t = dm.test_datasets
    assert {k: len(v) for k, v in t.items()} == {"all": 8, "md300": 4, "both": 8, "scan": 4}
    assert t["md300"].frame_indices().tolist() == [0, 1, 2, 3]  # frame numbers of the file, for errors.csv
    assert t["md300"]._data.forces.shape == (60, 3)
    scan_ref = [_energy(a) for a in ase.io.read(ACAC / "test_dihedral.xyz", index=":4")]
    assert t["scan"]._data.energy.tolist() == pytest.approx(scan_ref, abs=1e-9)
    # per-config-type reporting: sets with two types only
    assert dm.test_config_types == {"all": ["300K_MD", "600K_MD"], "both": ["300K_MD", "600K_MD"]}
    # the random-split and list forms are unchanged
    assert XYZDataModule(files / "train.xyz", test_files=[files / "mixed.xyz", files / "scan.xyz"]).test_files.keys() \
        == {"mixed", "scan"}


@pytest.mark.parametrize("spec, error, match", [
    ({"x": {"path": "mixed.xyz", "selct": {"config_type": "md"}}}, ValueError, r"test set 'x': unknown setting\(s\) \['selct'\]"),
    ({"x": {"select": {"config_type": "md"}}}, ValueError, r"test set 'x': no 'path' given"),
    ({"x": {"path": "mixed.xyz", "select": {"config_type": "md"}}}, ValueError,
     r"mixed\.xyz: no frame matches select \{'config_type': 'md'\}; values in the file: \{'config_type': \['300K_MD', '600K_MD'\]\}"),
    ({"x": {"path": "scan.xyz", "energy_key": "E_DFT"}}, KeyError, r"scan\.xyz: frame 0: no energy under key 'E_DFT'.*Did you mean 'E_dft'"),
])
def test_test_set_errors_name_set_file_and_key(files, spec, error, match):
    spec = {k: {**v, "path": files / v["path"]} if "path" in v else v for k, v in spec.items()}
    with pytest.raises(error, match=match):
        XYZDataModule(files / "train.xyz", test_files=spec, progress=False, cache=False).setup("fit")


# --------------------------------------------------------------------------- item 9: plain hyperparameters


def test_data_module_hyperparameters_are_plain(files):
    """Hydra passes lists and dicts as OmegaConf containers and presets pass paths: before, these went
    into every checkpoint, which torch.load(weights_only=True) refuses."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfgs = [compose("train", overrides=["data=xyz", f"data.train_file={files / 'train.xyz'}", "data.num_train=5",
                                            f"data.test_files={{a:{files / 'mixed.xyz'},b:{{path:{files / 'scan.xyz'},energy_key:E_dft}}}}"]),
                compose("train", overrides=["data=rmd17"])]
    GlobalHydra.instance().clear()
    modules = [instantiate(c.data) for c in cfgs] + [pyg_equireann.datamodules.acac_datamodule(), pyg_equireann.datamodules.MD17DataModule()]
    for dm in modules:
        loaded = torch.load(_saved(dm, files), weights_only=True)
        assert loaded == dict(dm.hparams)
    assert modules[0].hparams["test_files"]["b"] == {"path": str(files / "scan.xyz"), "energy_key": "E_dft"}
    assert OmegaConf.to_container(cfgs[0].data)["num_train"] == 5


def _saved(dm, d: Path) -> Path:
    path = d / f"hparams_{type(dm).__name__}.pt"
    torch.save(dict(dm.hparams), path)
    return path


# --------------------------------------------------------------------------- item 11: stress by default


@pytest.fixture(scope="module")
def cu_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cu")
    ase.io.write(d / "cu.xyz", ase.io.read(DATA / "cu_emt" / "train.xyz", index=":4"), format="extxyz")
    dm = XYZDataModule(d / "cu.xyz", val_fraction=0.25, cutoff=3.0, batch_size=3, dtype="float64", progress=False)
    dm.setup("fit")
    return dm


def cu_module(dm, **kwargs):
    config = {"_target_": "pyg_equireann.EquiREANN", "cutoff": 3.0, "num_channels": 4, "max_l": 1,
              "num_radial": 4, "elements": dm.elements}
    module = PotentialModule(model=config, **kwargs)
    s = dm.statistics
    module.model.set_energy_statistics(atomic_energies=s["atomic_energies"], scale=s["scale"], shift=s["shift"])
    return module.double()


def test_stress_in_the_data_is_trained_on_by_default(cu_data):
    """Before: module.stress_weight defaulted to 0, so the stress of the data was silently not trained on."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert compose("train", overrides=[]).module.stress_weight == "auto"
    GlobalHydra.instance().clear()
    batch = next(iter(cu_data.train_dataloader()))
    assert batch.stress.shape == (3, 3, 3)
    module = cu_module(cu_data)
    assert module.hparams.stress_weight == "auto"
    losses = {}
    for weight in ("auto", AUTO_STRESS_WEIGHT, 0.0):
        m = cu_module(cu_data, stress_weight=weight)
        out = m.predict_batch(batch, create_graph=False)
        loss, errors = m._loss_and_errors(batch, out)
        losses[weight] = float(loss.detach())
        assert "stress" in errors
    assert losses["auto"] == losses[AUTO_STRESS_WEIGHT] > losses[0.0]
    batch_without = batch.clone()
    del batch_without.stress
    assert module._weights(batch_without)["stress"] == 0.0


@pytest.mark.parametrize("weight, level, text", [
    ("auto", logging.INFO, "the training data has stress: in the loss with stress_weight 1000"),
    (0.0, logging.WARNING, "module.stress_weight=0 leaves it out of the loss"),
])
def test_stress_weight_is_logged_at_fit_start(cu_data, caplog, weight, level, text):
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False)
    with caplog.at_level(logging.INFO, logger="pyg_equireann"):
        trainer.fit(cu_module(cu_data, stress_weight=weight), datamodule=cu_data)
    assert any(r.levelno == level and text in r.getMessage() for r in caplog.records), caplog.text
