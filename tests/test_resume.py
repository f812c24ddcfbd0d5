"""Losing no work: ``last.ckpt`` is the last epoch (or the state at an interrupt), a resume continues the
run with its own config in its own folder and never overwrites its record, runs started together get their
own folders, and concurrent checkpoint writers never remove each other's files. Real Hydra runs, real
Lightning trainers and signals, real processes."""
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from pyg_equireann.training.checkpoint import atomic_torch_save
from pyg_equireann.cli.train import run as train_run

from .test_pipeline import BIN, TINY, cli_env, compose_train, hydra_app, last_epoch_values, read_csv

#: a tiny, exactly reproducible EquiREANN run
EXACT = [*TINY, "model.num_channels=8", "model.num_radial=8", "float64=true", "trainer.deterministic=true"]
#: epochs of last.ckpt seen at each epoch start by :class:`Probe`
SEEN = []


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)  # as in a fresh process (conftest sets float64)
    SEEN.clear()
    yield


class Probe(L.Callback):
    """Test callback: records ``last.ckpt``'s epoch at every epoch start; ``stop`` (``keyboard`` or
    ``sigterm``) interrupts training after global step ``at_step``, as Ctrl-C or SLURM's SIGTERM would."""

    def __init__(self, stop=None, at_step=5):
        self.stop, self.at_step = stop, at_step

    def on_train_epoch_start(self, trainer, pl_module):
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        SEEN.append(torch.load(last, weights_only=False)["epoch"] if last.exists() else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step and self.stop == "keyboard":
            raise KeyboardInterrupt
        if trainer.global_step == self.at_step and self.stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this batch


def _ckpt(run, name):
    return torch.load(run / "checkpoints" / f"{name}.ckpt", weights_only=False, map_location="cpu")


# --------------------------------------------------------------------------- 1. last.ckpt


@pytest.mark.parametrize("stop", ["keyboard", "sigterm", "budget", "max_time"])
def test_last_ckpt_is_the_last_epoch_or_where_training_stopped(stop, tmp_path):
    """lr = 0: the validation loss never improves after epoch 0, so best.ckpt stays at epoch 0, while
    last.ckpt follows every epoch (Lightning 2.6's ModelCheckpoint wrote it only with a new best) and
    holds the step where training stopped: interrupted (Ctrl-C, SIGTERM) in epoch 2, or stopped by a
    budget or ``trainer.max_time``."""
    common = [*EXACT, "module.lr=0", "test=false", "+callbacks.probe._target_=tests.test_resume.Probe",
              f"hydra.run.dir={tmp_path}"]
    if stop in ("keyboard", "sigterm"):
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(SystemExit) as exit:
                hydra_app([*common, "trainer.max_epochs=6", f"+callbacks.probe.stop={stop}"], train_run)
            assert exit.value.code == (1 if stop == "keyboard" else 128 + signal.SIGTERM)  # not success (0)
        finally:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C after the first
        stopped_at = 5
        assert SEEN == [None, 0, 1]
    else:
        limit = "budget.minutes=0.01" if stop == "budget" else "trainer.max_time=00:00:00:02"
        hydra_app([*common, "trainer.max_epochs=100000", limit], train_run)
        stopped_at = json.loads((tmp_path / "train_summary.json").read_text())["steps"]
        assert stopped_at > 2 and SEEN == [None, *range(len(SEEN) - 1)]  # stopped after epoch 0 (2 steps each)
    assert _ckpt(tmp_path, "last")["global_step"] == stopped_at
    assert _ckpt(tmp_path, "best")["epoch"] == 0


# --------------------------------------------------------------------------- 2. resume a run


def _digests(run):
    files = [*sorted((run / ".hydra").iterdir()), run / "config_resolved.yaml"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _latest_epoch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    """``make train``'s ``experiment=quick`` (batch size 5, one thread; an epoch-wise cosine schedule instead
    of its CPU-time budget) on tiny data, float64,
    deterministic, 5 epochs of 8 steps: an ``equireann-train`` process is killed with SIGKILL during epoch 2
    or 3, after last.ckpt of the previous epoch exists; ``ckpt_path=.../last.ckpt`` ALONE continues it with
    the run's own config (not the defaults: batch size 10, 100 epochs), and the final validation and test
    metrics equal those of an uninterrupted run bit for bit. The run's config record is not touched; the
    resume adds its own; resumes that change the model or data are refused, listing the changes. The
    uninterrupted and resumed runs run in this process (same code path, no start-up cost)."""
    # the budget off: its cosine follows the process clock, so no two runs with it are bit-identical
    common = ["experiment=quick", *EXACT, "data.num_train=40", "budget.minutes=null", "module.scheduler=cosine",
              "callbacks.ema.decay=0.9", "trainer.max_epochs=5"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    victim = subprocess.Popen([str(BIN / "equireann-train"), *common, f"hydra.run.dir={killed}"], cwd=tmp_path,
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill_after_epoch_1():
        deadline = time.time() + 240
        while time.time() < deadline and victim.poll() is None:
            epoch = _latest_epoch(last) if last.exists() else None
            if epoch is not None and epoch >= 1:
                time.sleep(0.3)  # into the next epoch (about 1 s each)
                break
            time.sleep(0.02)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
        victim.wait()

    killer = threading.Thread(target=kill_after_epoch_1)
    killer.start()
    hydra_app([*common, f"hydra.run.dir={full}"], train_run)  # meanwhile: the uninterrupted run
    killer.join()
    stderr = victim.stderr.read()
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it was killed: " + stderr[-2000:]
    killed_at = torch.load(last, weights_only=True)["epoch"]  # readable: written atomically
    assert 1 <= killed_at <= 3 and not (killed / "test_metrics.json").exists()
    logged = {int(r["epoch"]) for r in read_csv(killed / "logs" / "metrics.csv") if r["val/loss"]}
    # last.ckpt is the last epoch whose checkpoint was written, not the best one. Lightning writes an epoch's
    # validation row to metrics.csv before the checkpoint hooks run, so a kill in between (or during the
    # save) leaves that epoch logged but not saved: at most the epoch in progress is lost.
    # (test_last_ckpt_is_the_last_epoch_or_where_training_stopped checks every epoch without this race.)
    assert max(logged) - 1 <= killed_at <= max(logged)
    record = _digests(killed)

    # refused: another model (in this process) or other data (the command: exit code 2, one line each)
    refused = subprocess.Popen([str(BIN / "equireann-train"), f"ckpt_path={last}", "data.batch_size=7",
                                "trainer.max_epochs=9"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    with pytest.raises(ValueError, match=r"(?m)^  model\.num_channels: run 8, command line 16$"):
        hydra_app([f"ckpt_path={last}", "model.num_channels=16"], train_run)

    hydra_app([f"ckpt_path={last}"], train_run)  # resumes in the killed run's folder, with its config
    (resumed_csv,) = killed.glob("logs_resumed_*/metrics.csv")
    resumed = read_csv(resumed_csv)
    assert min(int(r["epoch"]) for r in resumed if r["val/loss"]) == killed_at + 1
    epoch_full, val_full = last_epoch_values(read_csv(full / "logs" / "metrics.csv"), "val/")
    epoch_resumed, val_resumed = last_epoch_values(resumed, "val/")
    assert epoch_full == epoch_resumed == 4
    assert val_full == val_resumed  # bit-identical
    assert json.loads((full / "test_metrics.json").read_text()) == json.loads((killed / "test_metrics.json").read_text())
    (info,) = killed.glob("run_info_resumed_*.json")
    config = json.loads(info.read_text())["config"]  # the config this resume ran with, in its own record
    assert config.startswith("resumes/") and (killed / config).is_file()

    _, stderr = refused.communicate(timeout=240)
    assert refused.returncode == 2, stderr[-3000:]
    assert "\n  data.batch_size: run 5, command line 7\n" in stderr and "max_epochs" not in stderr.split("(allowed")[0]
    assert "resume_overrides=allow" in stderr and "Traceback" not in stderr
    assert _digests(killed) == record  # the run's own record is unchanged
    (resume,) = (killed / "resumes").iterdir()  # one record per accepted resume, none for the refused ones
    assert OmegaConf.load(resume / "overrides.yaml") == [f"ckpt_path={last}"]
    ran = OmegaConf.load(resume / "config_resolved.yaml")
    assert ran.data.batch_size == 5 and ran.trainer.max_epochs == 5 and ran.module.scheduler == "cosine"
    assert ran.run_name == "equireann_rmd17" and ran.ckpt_path == str(last)
    assert OmegaConf.load(resume / "config.yaml").data.molecule == "ethanol"


def test_resume_with_allowed_overrides(tmp_path):
    """``resume_overrides=allow`` takes a change of the experiment; a harmless override (more epochs)
    needs no flag and is recorded in the resume's config."""
    run = tmp_path / "run"
    hydra_app([*EXACT, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run}"], train_run)
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"(?m)^  module\.energy_weight: run 1\.0, command line 2\.0$"):
        hydra_app([f"ckpt_path={last}", "module.energy_weight=2.0", "trainer.max_epochs=2"], train_run)
    hydra_app([f"ckpt_path={last}", "module.energy_weight=2.0", "trainer.max_epochs=2", "resume_overrides=allow"],
              train_run)
    (resume,) = (run / "resumes").iterdir()
    ran = OmegaConf.load(resume / "config_resolved.yaml")
    assert ran.module.energy_weight == 2 and ran.trainer.max_epochs == 2 and ran.model.num_channels == 8
    assert _ckpt(run, "last")["epoch"] == 1


# --------------------------------------------------------------------------- 3. run folders, writers


def test_runs_started_together_get_their_own_folders(tmp_path, monkeypatch):
    """Two ``equireann-train`` runs started at the same moment, with the same time stamp (the default
    folder name has one-second resolution): two folders, each with its own complete record and results; two
    evaluations, benchmarks or non-local experiments of the same second likewise."""
    stamp = "hydra.run.dir=${run_dir:null," + str(tmp_path / "runs") + ",20260101-000000}"
    procs = [subprocess.Popen([str(BIN / "equireann-train"), *EXACT, "trainer.max_epochs=1", "test=false",
                               f"seed={seed}", stamp], cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert [f.name for f in folders] == ["20260101-000000", "20260101-000000-2"]
    assert sorted(OmegaConf.load(f / "config_resolved.yaml").seed for f in folders) == [1, 2]
    for folder in folders:
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").seed == OmegaConf.load(folder / "config_resolved.yaml").seed
        assert {int(r["epoch"]) for r in read_csv(folder / "logs" / "metrics.csv") if r["val/loss"]} == {0}
        assert _ckpt(folder, "last")["epoch"] == 0
    # the default folder name: a second run in the same second gets its own folder, too
    monkeypatch.chdir(tmp_path)
    dirs = [Path(compose_train([], tmp_path).hydra.run.dir) for _ in range(2)]
    assert dirs[0] != dirs[1] and all(d.is_dir() and d.parent == Path("runs/equireann_rmd17") for d in dirs)
    # and so do evaluations, benchmarks and non-local experiments
    for config_name, overrides, parent in (("eval", ["ckpt_path=run/checkpoints/best.ckpt"], "run/eval"),
                                           ("bench", [], "bench_runs/speed"), ("nonlocal", [], "runs/nonlocal")):
        dirs = [Path(compose_train(overrides, tmp_path, config_name).hydra.run.dir) for _ in range(2)]
        assert dirs[0] != dirs[1] and all(d.is_dir() and d.parent.resolve() == (tmp_path / parent).resolve() for d in dirs), dirs


def _save_many(path, seed, count, queue):
    try:
        payload = torch.arange(250_000, dtype=torch.float64)  # 2 MB
        for k in range(count):
            atomic_torch_save({"writer": seed, "k": k, "payload": payload + seed}, path)
        queue.put(None)
    except BaseException as error:  # noqa: BLE001 (reported to the test)
        queue.put(repr(error))


def test_concurrent_writers_to_one_checkpoint(tmp_path):
    """Two processes save 2 MB checkpoints to the same file 25 times each: no save fails (neither
    removes the other's temporary file) and the file is always one complete checkpoint."""
    context = multiprocessing.get_context("fork")
    path = tmp_path / "last.ckpt"
    queue = context.Queue()
    procs = [context.Process(target=_save_many, args=(path, seed, 25, queue)) for seed in (1, 2)]
    for proc in procs:
        proc.start()
    errors = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    assert errors == [None, None]
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["payload"], torch.arange(250_000, dtype=torch.float64) + checkpoint["writer"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    """Temporary files of killed saves (a pid of this host that is gone; old unowned names) are removed
    by the next save; those of live writers (this host) and of other hosts (shared file systems) stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    host = socket.gethostname()
    try:
        names = {"dead": f".last.ckpt.{host}.{dead.pid}.abc_12.tmp", "unowned": ".last.ckpt.x7q_2k.tmp",
                 "live": f".last.ckpt.{host}.{live.pid}.abc_12.tmp", "other host": ".last.ckpt.node7.1.abc_12.tmp"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        atomic_torch_save({"k": 1}, tmp_path / "last.ckpt")
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", names["live"], names["other host"]])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"k": 1}
