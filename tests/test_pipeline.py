"""Tests of the training pipeline: Hydra configs, sweeps, the ``equireann-train``/``equireann-eval``
CLIs, loss decrease, exact resume, and DDP on CPU. Real shipped data (``data/rmd17``), real Lightning
trainers and real Hydra composition, on tiny slices so that the whole file runs in a few minutes on 2 CPU
cores. Unit conversion and E0 fitting are tested in ``test_datamodules.py``."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from itertools import product
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import pyg_equireann.datamodules
from pyg_equireann.cli import CONF_DIR
from pyg_equireann.training.prepare import prepare_model_config
from pyg_equireann.cli.train import run as train_run
from pyg_equireann.testing import SMALL_MODEL_OVERRIDES
from pyg_equireann.training.module import PotentialModule

BIN = Path(sys.executable).parent
#: tiny data and a quiet, single-threaded trainer for every run in this file
TINY = ["data.num_train=20", "data.num_val=10", "data.num_test=10", "trainer.enable_progress_bar=false",
        "num_threads=1"]
#: small hidden sizes per model config (the configs' defaults are the published sizes); the baselines as in
#: the physics suite
SMALL = {
    "equireann": ["model.num_channels=8", "model.num_radial=8"],
    "equireann_nopassing": ["model.num_channels=8"],
    "reann": ["model.num_channels=8"],
    **{name: SMALL_MODEL_OVERRIDES[name] for name in ("schnet", "dimenetpp", "visnet", "mace")},
}
MODEL_TARGETS = {
    "equireann": "pyg_equireann.EquiREANN",
    "equireann_nopassing": "pyg_equireann.EquiREANN",
    "reann": "pyg_equireann.REANN",
    "schnet": "torch_geometric.nn.models.SchNet",
    "dimenetpp": "pyg_equireann.models.pyg.DimeNetPlusPlusPotential",
    "visnet": "pyg_equireann.models.pyg.ViSNetPotential",
    "mace": "pyg_equireann.models.mace.MACEPotential",
}


@pytest.fixture(autouse=True)
def _isolate():
    """Every test starts and ends without a global Hydra instance; torch's thread count is restored
    (runs here use ``num_threads=1``)."""
    threads = torch.get_num_threads()
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
    torch.set_num_threads(threads)


def compose_train(overrides, output_dir, config_name="train") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` (and its ``hydra`` node), registered as the
    current HydraConfig so that ``${hydra:...}`` interpolations resolve as in a real run."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def resolved_task(cfg: DictConfig) -> dict:
    """The job config (without ``hydra``) with every interpolation resolved."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def hydra_app(overrides, task, config_name="train", multirun=False):
    """Run ``task`` through Hydra exactly as ``@hydra.main`` does (composition, run/sweep folders,
    ``.hydra/``, job logging, sweeper and launcher), but inside this process."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    GlobalHydra.instance().clear()
    try:
        app = Hydra.create_main_hydra2(task_name=config_name, config_search_path=create_config_search_path(CONF_DIR))
        if multirun:
            return app.multirun(config_name=config_name, task_function=task, overrides=list(overrides))
        return app.run(config_name=config_name, task_function=task, overrides=list(overrides)).return_value
    finally:
        GlobalHydra.instance().clear()


def cli_env():
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def cli(name, *args, cwd, timeout=300):
    return subprocess.run([str(BIN / name), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_epoch_values(rows, prefix):
    """{column: float} of the last epoch's row that has ``prefix`` columns filled."""
    rows = [r for r in rows if any(k.startswith(prefix) and r[k] not in ("", None) for k in r)]
    last = rows[-1]
    return int(last["epoch"]), {k: float(v) for k, v in last.items() if k.startswith(prefix) and v not in ("", None)}


def ethanol_datamodule(**kwargs):
    args = dict(molecule="ethanol", num_train=20, num_val=10, num_test=10, batch_size=5, cutoff=4.0,
                dtype="float64", progress=False, download=False)
    args.update(kwargs)
    dm = pyg_equireann.datamodules.MD17DataModule(**args)
    dm.setup("fit")
    return dm


def make_module(model_config, dm, **module_kwargs) -> PotentialModule:
    """A PotentialModule with energy statistics from the data module, as ``equireann-train`` builds it."""
    module = PotentialModule(model=model_config, **module_kwargs)
    stats = dm.statistics
    module.model.set_energy_statistics(atomic_energies=stats["atomic_energies"], scale=stats["scale"],
                                       shift=stats["shift"])
    return module.double()


# --------------------------------------------------------------------------- 1. composition


@pytest.mark.parametrize("model", list(MODEL_TARGETS))
def test_compose_and_run_every_model(model, tmp_path):
    """Each model config composes, instantiates (``auto`` entries filled from the data) and gives finite
    energies and forces on a shipped ethanol frame; PyG's models need neither pyg-lib nor torch-sparse."""
    torch.manual_seed(0)
    cfg = compose_train([f"model={model}", *SMALL[model], *TINY, "float64=true"], tmp_path)
    task = resolved_task(cfg)
    assert task["model"]["_target_"] == MODEL_TARGETS[model]
    assert task["data"]["cutoff"] == task["model"]["cutoff"]  # the data module builds the model's graph
    assert task["run_name"] == f"{model}_rmd17"
    if model == "equireann_nopassing":
        assert task["model"]["equivariant_passing"] is False
    if model == "schnet":
        assert task["model"]["interaction_graph"]["cutoff"] == task["model"]["cutoff"]

    dm = ethanol_datamodule()  # cutoff 4 Å graphs: used by EquiREANN/REANN, the others build their own
    config = prepare_model_config(cfg.model, dm)
    if "elements" in config:
        assert config["elements"] == [1, 6, 8]
        assert config["avg_num_neighbors"] == pytest.approx(dm.statistics["avg_num_neighbors"])
    module = make_module(config, dm)
    batch = next(iter(dm.train_dataloader()))
    out = module.predict_batch(batch, create_graph=False)
    assert out["energy"].shape == (batch.num_graphs,)
    assert out["forces"].shape == batch.pos.shape
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    # the reference energies are set: predictions are in the range of the data (eV)
    assert (out["energy"] - batch.energy).abs().max() < 100.0


@pytest.mark.parametrize("data", ["rmd17", "md17", "xyz", "acac", "cumulene"])
def test_compose_data(data, tmp_path):
    overrides = [f"data={data}"]
    if data == "xyz":
        overrides.append(f"data.train_file={CONF_DIR}/../data/cumulene/cumulene_train.xyz")
    cfg = compose_train([*overrides, "model.cutoff=3.5", "float64=true", "seed=7"], tmp_path)
    task = resolved_task(cfg)
    d = task["data"]
    assert d["cutoff"] == 3.5 and d["dtype"] == "float64" and d["seed"] == 7
    assert callable(get_object(d["_target_"]))
    expected = {"rmd17": "pyg_equireann.datamodules.MD17DataModule", "md17": "pyg_equireann.datamodules.MD17DataModule",
                "xyz": "pyg_equireann.datamodules.XYZDataModule", "acac": "pyg_equireann.datamodules.acac_datamodule",
                "cumulene": "pyg_equireann.datamodules.cumulene_datamodule"}[data]
    assert d["_target_"] == expected
    if data in ("rmd17", "md17", "acac", "cumulene"):
        assert Path(d["root"]).resolve() == (Path(CONF_DIR).parent / "data").resolve()
    if data == "md17":
        assert (d["variant"], d["molecule"]) == ("original", "aspirin")
    if data == "rmd17":
        assert (d["variant"], d["molecule"], d["num_train"], d["num_val"]) == ("revised", "ethanol", 950, 50)
    assert task["run_name"] == f"equireann_{data}"


def test_compose_missing_xyz_file(tmp_path):
    cfg = compose_train(["data=xyz"], tmp_path)
    assert OmegaConf.is_missing(cfg.data, "train_file")


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_compose_trainer(trainer, tmp_path):
    t = resolved_task(compose_train([f"trainer={trainer}"], tmp_path))["trainer"]
    assert t["_target_"] == "lightning.pytorch.Trainer"
    assert t["inference_mode"] is False  # forces need autograd in validation/test
    assert t["accelerator"] == {"cpu": "cpu", "gpu": "gpu", "ddp": "cpu"}[trainer]
    assert t["devices"] == (2 if trainer == "ddp" else 1)
    assert t.get("strategy") == ("ddp" if trainer == "ddp" else None)
    if trainer == "cpu":
        trainer_obj = instantiate(t, logger=False, enable_checkpointing=False, enable_model_summary=False)
        assert trainer_obj.max_epochs == 100 and trainer_obj.gradient_clip_val == 10.0


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_compose_logger_and_callbacks(logger, tmp_path):
    task = resolved_task(compose_train([f"logger={logger}"], tmp_path))
    loggers = task["logger"]
    assert loggers["csv"]["_target_"] == "lightning.pytorch.loggers.CSVLogger"
    assert loggers["csv"]["save_dir"] == str(tmp_path) and loggers["csv"]["version"] == "logs"
    if logger == "tensorboard":
        assert loggers["tensorboard"]["_target_"] == "lightning.pytorch.loggers.TensorBoardLogger"
        assert loggers["tensorboard"]["save_dir"] == str(tmp_path)
    else:
        assert set(loggers) == {"csv"}
    csv_logger = instantiate(loggers["csv"])
    assert Path(csv_logger.log_dir) == tmp_path / "logs"
    callbacks = {k: instantiate(v) for k, v in task["callbacks"].items()}
    assert Path(callbacks["checkpoint"].dirpath) == tmp_path / "checkpoints"
    assert callbacks["checkpoint"].monitor == "val/loss" and callbacks["checkpoint"].save_last
    assert type(callbacks["ema"]).__name__ == "EMA"


@pytest.mark.parametrize("experiment", ["rmd17_aspirin", "rmd17_ethanol", "acac_300K", "quick"])
def test_compose_experiment(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    task = resolved_task(cfg)
    assert task["data"]["cutoff"] == task["model"]["cutoff"]
    if experiment.startswith("rmd17"):
        assert task["data"]["_target_"] == "pyg_equireann.datamodules.MD17DataModule"
        assert task["data"]["molecule"] == experiment.split("_")[1]
        assert task["trainer"]["max_epochs"] == 300
    elif experiment == "acac_300K":
        assert task["data"]["_target_"] == "pyg_equireann.datamodules.acac_datamodule"
        assert task["run_name"] == "equireann_acac"
        assert task["trainer"]["max_epochs"] == 200
    else:
        assert task["model"]["_target_"] == "pyg_equireann.EquiREANN"
        assert (task["data"]["molecule"], task["data"]["batch_size"]) == ("ethanol", 5)
        # experiment values win over train.yaml's top-level defaults (num_threads: null)
        assert task["module"]["scheduler"] == "none" and task["num_threads"] == 1
        # a CPU-time budget with the cosine over it, not a wall-clock limit (robust to machine load)
        assert task["budget"]["clock"] == "process" and task["budget"]["cosine_lr"] and task["budget"]["minutes"] > 0
        assert task["trainer"]["max_time"] is None


def test_compose_optuna_search(tmp_path):
    cfg = compose_train(["hparams_search=optuna"], tmp_path)
    assert cfg.optimized_metric == "val/forces_mae"
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "minimize" and sweeper.n_trials == 20
    sampler = instantiate(sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"
    for key in sweeper.params:  # every searched parameter exists in the composed config
        assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", key


@pytest.mark.parametrize("launcher,cls,cpus", [("submitit_local", "LocalLauncher", 2),
                                                ("submitit_slurm", "SlurmLauncher", 8)])
def test_compose_launcher(launcher, cls, cpus, tmp_path):
    cfg = compose_train([f"launcher={launcher}"], tmp_path)
    assert get_class(cfg.hydra.launcher._target_).__name__ == cls
    assert cfg.hydra.launcher.cpus_per_task == cpus and cfg.hydra.launcher.timeout_min == 240


def test_run_dir_and_resume_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder is created when the config is read
    cfg = compose_train([], tmp_path)
    assert cfg.hydra.run.dir.startswith("runs/equireann_rmd17/") and Path(cfg.hydra.run.dir).is_dir()
    ckpt = tmp_path / "some_run" / "checkpoints" / "last.ckpt"
    cfg = compose_train([f"ckpt_path={ckpt}"], tmp_path)
    assert Path(cfg.hydra.run.dir) == (tmp_path / "some_run").resolve()
    assert resolved_task(cfg)["logger"]["csv"]["version"].startswith("logs_resumed_")


# --------------------------------------------------------------------------- 2. sweeps and typos


def test_multirun_expands_to_four_jobs(tmp_path):
    """``-m model=equireann,reann data.molecule=ethanol,aspirin`` runs 4 jobs (Hydra's basic sweeper and
    launcher), each with its own folder and fully resolvable config; the task here trains nothing."""
    jobs = []

    def task(cfg):
        hc = HydraConfig.get()
        resolved = OmegaConf.to_container(cfg, resolve=True)
        jobs.append((hc.job.num, resolved["model"]["_target_"], resolved["data"]["molecule"], hc.runtime.output_dir,
                     resolved["logger"]["csv"]["save_dir"], resolved["run_name"]))
        return hc.job.num

    sweep_dir = tmp_path / "multirun"
    ret = hydra_app(["model=equireann,reann", "data.molecule=ethanol,aspirin", f"hydra.sweep.dir={sweep_dir}"],
                    task, multirun=True)
    assert len(ret) == 1 and len(ret[0]) == 4
    assert all(r.status == JobStatus.COMPLETED for r in ret[0])
    assert sorted(r.return_value for r in ret[0]) == [0, 1, 2, 3]
    combos = {(target, mol) for _, target, mol, *_ in jobs}
    assert combos == set(product(["pyg_equireann.EquiREANN", "pyg_equireann.REANN"], ["ethanol", "aspirin"]))
    out_dirs = {Path(j[3]) for j in jobs}
    assert len(out_dirs) == 4 and all(d.parent == sweep_dir for d in out_dirs)
    for num, target, mol, out_dir, log_dir, run_name in jobs:
        assert log_dir == out_dir  # each job logs into its own folder
        assert run_name == ("equireann" if target.endswith("EquiREANN") else "reann") + "_rmd17"
        assert Path(out_dir).name.startswith(f"{num}_") and f"data.molecule={mol}" in Path(out_dir).name
        assert (Path(out_dir) / ".hydra" / "overrides.yaml").is_file()


def test_optuna_sweep_without_training(tmp_path):
    """``hparams_search=optuna``: the search space applies to existing keys and the sweeper minimises
    the task's return value (a stand-in for ``optimized_metric``)."""
    seen = []

    def task(cfg):
        seen.append((cfg.module.lr, cfg.model.num_channels, cfg.model.num_iterations))
        return cfg.module.lr

    hydra_app(["hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}"], task,
              multirun=True)
    assert len(seen) == 3
    for lr, channels, iterations in seen:
        assert 0.001 <= lr <= 0.02 and channels in (24, 36, 64) and iterations in (1, 2, 3)


def test_typo_overrides_give_hydra_errors(tmp_path):
    """A misspelt key or group is reported by Hydra in one message, a missing data file by ours (naming
    the file and folder), each without a Python traceback."""
    cases = {"model.num_chanels=3": "num_chanels", "modl=reann": "modl",
             "data.molecule=benzene": "rmd17_benzene_train_01.npz"}
    procs = {arg: subprocess.Popen([str(BIN / "equireann-train"), arg, *TINY, f"hydra.run.dir={tmp_path}/run"],
                                   cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for arg in cases}
    for arg, bad_key in cases.items():
        _, stderr = procs[arg].communicate(timeout=120)
        assert procs[arg].returncode != 0
        assert bad_key in stderr, stderr
        assert "Could not override" in stderr or "error: rMD17 files for 'benzene'" in stderr, stderr
        assert "Traceback" not in stderr, stderr
        assert "HYDRA_FULL_ERROR=1" in stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- 3. CLI end to end


@pytest.mark.parametrize("model", ["equireann", "reann", "schnet"])
def test_train_and_eval_cli(model, tmp_path):
    """2 epochs of training, then evaluation of ``best.ckpt``: the run folder's files and configs, finite
    metrics, and ``equireann-eval`` gives the test metrics of the final test after training. EquiREANN
    goes through the installed commands (fresh processes, exit code 0); REANN and SchNet through the
    same Hydra apps in this process (:func:`hydra_app`), which spares two interpreter start-ups
    (~7 CPU-s of imports each) per model and tests the same code from composition on."""
    from pyg_equireann.cli.evaluate import run as eval_run

    def command(name, task, *args, config_name="train"):
        if model == "equireann":
            r = cli(name, *args, cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-4000:]
        else:
            torch.set_default_dtype(torch.float32)  # as in a fresh process (float64=false)
            hydra_app(args, task, config_name=config_name)

    run_dir = tmp_path / "run"
    command("equireann-train", train_run, f"model={model}", *SMALL[model], *TINY, "trainer.max_epochs=2",
            f"hydra.run.dir={run_dir}")
    for name in (".hydra/config.yaml", "config_resolved.yaml", "logs/metrics.csv", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt", "learning_curve.png", "test_metrics.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").model._target_ == MODEL_TARGETS[model]
    resolved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert resolved.data.cutoff == resolved.model.cutoff and resolved.logger.csv.save_dir == str(run_dir)
    rows = read_csv(run_dir / "logs" / "metrics.csv")
    assert {int(row["epoch"]) for row in rows if row["val/forces_mae"]} == {0, 1}
    assert all(math.isfinite(float(row["train/loss"])) for row in rows if row["train/loss"])
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    assert math.isfinite(tested["test/forces_mae"]) and tested["test/forces_mae"] > 0

    best = run_dir / "checkpoints" / "best.ckpt"
    command("equireann-eval", eval_run, f"ckpt_path={best}", "data.num_test=10", "num_threads=1", config_name="eval")
    (eval_dir,) = (run_dir / "eval").glob("rmd17_*")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test/forces_mae"])
    # the same EMA weights and the same 10 test frames as trainer.test after training
    assert metrics["test/forces_mae"] == pytest.approx(tested["test/forces_mae"], rel=1e-4)
    assert metrics["test/energy_mae"] == pytest.approx(tested["test/energy_mae"], rel=1e-3, abs=1e-3)
    assert (eval_dir / "parity.png").stat().st_size > 0
    errors = read_csv(eval_dir / "errors.csv")
    assert len(errors) == 10 and len((eval_dir / "errors.csv").read_text().splitlines()) == 11
    assert {row["set"] for row in errors} == {"test"} and all(int(row["natoms"]) == 9 for row in errors)


# --------------------------------------------------------------------------- 4. loss decreases


@pytest.mark.parametrize("seed", [0, 7])
def test_loss_decreases(seed):
    """20 epochs × 4 steps of EquiREANN on 20 ethanol frames: training and validation loss fall by more
    than 15 % (seeds 0-8 all fall by 24-90 %; the zero-initialised readout gives a slow start)."""
    torch.set_num_threads(1)
    L.seed_everything(seed, verbose=False)
    dm = ethanol_datamodule(seed=seed)
    model = dict(_target_="pyg_equireann.EquiREANN", cutoff=4.0, max_l=2, num_radial=8, num_channels=8,
                 num_iterations=2, equivariant_passing=True, avg_num_neighbors="auto", elements="auto")
    module = make_module(prepare_model_config(OmegaConf.create(model), dm), dm, lr=0.01, scheduler="none")
    history = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            history.append((float(trainer.callback_metrics["train/loss"]), float(trainer.callback_metrics["val/loss"])))

    trainer = L.Trainer(max_epochs=20, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
    assert len(history) == 20
    train, val = zip(*history)
    assert all(math.isfinite(x) for x in train + val)
    assert min(train[-3:]) < 0.85 * train[0], train
    assert val[-1] < 0.85 * val[0], val


def test_training_metrics_are_the_epoch_means_of_the_batches():
    """train/loss is the batch-size-weighted mean of the epoch's step losses (summed in training_step, logged once
    after the last batch); when a callback stops training mid-epoch, the partial epoch's mean is logged."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = ethanol_datamodule(seed=0, batch_size=6)  # 20 frames: batches of 6, 6, 6, 2
    module = make_module(prepare_model_config(OmegaConf.create(
        dict(_target_="pyg_equireann.EquiREANN", cutoff=4.0, max_l=1, num_radial=4, num_channels=4, num_iterations=1,
             elements="auto", avg_num_neighbors="auto")), dm), dm, lr=0.01, scheduler="none")
    steps, logged = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append((trainer.current_epoch, float(outputs["loss"]), int(batch.num_graphs)))
            if trainer.current_epoch == 2 and batch_idx == 1:
                trainer.should_stop = True  # as the training budget does

        def on_train_epoch_end(self, trainer, pl_module):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer = L.Trainer(max_epochs=5, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
    assert [sum(1 for e, _, _ in steps if e == epoch) for epoch in range(3)] == [4, 4, 2]
    assert len(logged) == 3 and all(set(m) == {"train/loss", "train/energy_mae", "train/forces_mae"} for m in logged)
    for epoch, metrics in enumerate(logged):
        batches = [(loss, n) for e, loss, n in steps if e == epoch]
        expected = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
        assert metrics["train/loss"] == pytest.approx(expected, rel=1e-6)
        assert metrics["train/forces_mae"] > 0 and metrics["train/energy_mae"] > 0


# --------------------------------------------------------------------------- 5. resume


def test_resume_equals_uninterrupted(tmp_path):
    """3 epochs in one go == 2 epochs, then ``ckpt_path=.../last.ckpt`` for 1 more (optimizer, plateau
    scheduler, EMA, sampler epoch and RNG restored): identical validation/test metrics and weights."""
    common = [*TINY, "model.num_channels=8", "float64=true", "trainer.deterministic=true", "data.batch_size=5",
              "module.plateau_patience=0", "callbacks.ema.decay=0.9", "trainer.log_every_n_steps=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    hydra_app([*common, "trainer.max_epochs=3", f"hydra.run.dir={full}"], train_run)
    hydra_app([*common, "trainer.max_epochs=2", f"hydra.run.dir={part}"], train_run)
    # no hydra.run.dir: the resumed run must find its folder from the checkpoint
    hydra_app([*common, "trainer.max_epochs=3", f"ckpt_path={part / 'checkpoints' / 'last.ckpt'}"], train_run)

    first = read_csv(part / "logs" / "metrics.csv")
    assert {int(r["epoch"]) for r in first if r["val/loss"]} == {0, 1}
    (resumed_csv,) = part.glob("logs_resumed_*/metrics.csv")
    resumed = read_csv(resumed_csv)
    assert {int(r["epoch"]) for r in resumed if r["val/loss"] or r["train/loss"]} == {2}  # continued at epoch 2
    epoch_full, val_full = last_epoch_values(read_csv(full / "logs" / "metrics.csv"), "val/")
    epoch_resumed, val_resumed = last_epoch_values(resumed, "val/")
    assert epoch_full == epoch_resumed == 2
    assert val_full and val_full == pytest.approx(val_resumed, rel=1e-9, abs=0)
    _, train_full = last_epoch_values(read_csv(full / "logs" / "metrics.csv"), "train/")
    _, train_resumed = last_epoch_values(resumed, "train/")
    assert train_full == pytest.approx(train_resumed, rel=1e-9, abs=0)
    # lr after a plateau step is logged: the scheduler state must have been restored too
    lrs_full = [float(r["lr-AdamW"]) for r in read_csv(full / "logs" / "metrics.csv") if r.get("lr-AdamW")]
    lrs_resumed = [float(r["lr-AdamW"]) for r in resumed if r.get("lr-AdamW")]
    assert lrs_resumed and lrs_resumed[-1] == lrs_full[-1]

    test_full = json.loads((full / "test_metrics.json").read_text())
    test_resumed = json.loads((part / "test_metrics.json").read_text())
    assert test_full == pytest.approx(test_resumed, rel=1e-9, abs=0)
    ckpt_full = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    ckpt_resumed = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt_full["epoch"] == ckpt_resumed["epoch"] and ckpt_full["global_step"] == ckpt_resumed["global_step"]
    for key, value in ckpt_full["state_dict"].items():
        torch.testing.assert_close(ckpt_resumed["state_dict"][key], value, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- 6. DDP

DDP_SCRIPT = '''
"""Two epochs of one optimiser step each with conf/trainer/ddp.yaml (2 ranks x 5 frames) or a single
process (10 frames)."""
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pyg_equireann.cli import CONF_DIR
from pyg_equireann.training.prepare import build_module


class Grab(L.Callback):
    """Per rank: training frame indices, gradients after backward (DDP: all-reduced), final weights."""

    def __init__(self):
        self.indices, self.grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(sorted(batch.idx.view(-1).tolist()))

    def on_after_backward(self, trainer, pl_module):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def main(mode, out, init=None):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    L.seed_everything(0, verbose=False)
    batch_size = 5 if mode == "ddp" else 10  # ddp: 10 frames = 2 ranks x 1 batch of 5
    overrides = ["trainer=ddp" if mode == "ddp" else "trainer=cpu", "data.num_train=10", "data.num_val=10",
                 "data.num_test=10", f"data.batch_size={batch_size}", "float64=true", "model.num_channels=8",
                 "module.scheduler=none"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    dm = instantiate(cfg.data, progress=False)
    dm.setup("fit")
    module = build_module(cfg.model, cfg.module, dm, float64=True, calibrate_densities=False)
    # perturb every weight (the readout starts at zero, which would leave most gradients exactly zero)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    if init is not None:
        module.load_state_dict(torch.load(init, weights_only=True))
    grab = Grab()
    trainer = instantiate(cfg.trainer, max_epochs=2, logger=False, callbacks=[grab], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    if mode == "ddp" and trainer.global_rank == 0:
        torch.save(module.state_dict(), Path(out) / "init.pt")
    trainer.fit(module, datamodule=dm)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    result = {"strategy": type(trainer.strategy).__name__, "world_size": trainer.world_size, "backend": backend,
              "indices": grab.indices, "grads": grab.grads, "global_step": trainer.global_step,
              "params": {n: p.detach().clone() for n, p in module.named_parameters()},
              "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
    torch.save(result, Path(out) / f"{mode}_rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''


def test_ddp_matches_single_process(tmp_path):
    """``trainer=ddp``: 2 CPU processes (gloo), one batch of 5 frames each per epoch, 2 epochs. The
    all-reduced gradients, the weights after each step and the validation metrics (summed over ranks)
    equal a single process's on the union of both batches (the same 10 frames)."""
    script = tmp_path / "ddp_step.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    r = subprocess.run([sys.executable, str(script), "ddp", str(tmp_path)], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"ddp_rank{k}.pt", weights_only=False) for k in (0, 1)]
    for res in ranks:
        assert res["strategy"] == "DDPStrategy" and res["world_size"] == 2 and res["backend"] == "gloo"
        assert res["global_step"] == 2 and [len(b) for b in res["indices"]] == [5, 5]
    for epoch in (0, 1):  # the ranks split the training set
        assert set(ranks[0]["indices"][epoch]).isdisjoint(ranks[1]["indices"][epoch])

    spec = importlib.util.spec_from_file_location("ddp_step", script)
    ddp_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_step)
    previous = torch.get_default_dtype()
    try:
        single = ddp_step.main("single", str(tmp_path), init=str(tmp_path / "init.pt"))
    finally:
        torch.set_default_dtype(previous)
    assert single["world_size"] == 1 and single["global_step"] == 2
    for epoch in (0, 1):
        assert single["indices"][epoch] == sorted(ranks[0]["indices"][epoch] + ranks[1]["indices"][epoch])

    assert len(single["grads"]) == len(ranks[0]["grads"]) == 2
    for step in (0, 1):
        reference = single["grads"][step]
        assert sum(bool(g.abs().max() > 0) for g in reference.values()) > 0.9 * len(reference)
        for name, grad in reference.items():
            torch.testing.assert_close(ranks[0]["grads"][step][name], ranks[1]["grads"][step][name], rtol=0, atol=0)
            torch.testing.assert_close(ranks[0]["grads"][step][name], grad, rtol=1e-5, atol=1e-10)
    for name, param in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["params"][name], param, rtol=1e-6, atol=1e-9)
    assert single["metrics"].keys() == ranks[0]["metrics"].keys() and "val/forces_mae" in single["metrics"]
    for key, value in single["metrics"].items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-6), key
        assert ranks[1]["metrics"][key] == pytest.approx(value, rel=1e-6), key
