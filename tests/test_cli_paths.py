"""The paths a user walks with the CLIs: per-epoch log lines and the reason training stopped (also
outside a terminal), a training budget that is not cut short by the epoch cap, the error text in
``train.log``, unwritable output folders and mistyped overrides as one-line errors (exit code 2), and
the progress lines of ``examples/run_md.py``. Real CLIs (subprocesses, where the exit code and stderr
are what is tested), real Hydra, real Lightning trainers on tiny data."""
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import Callback

from pyg_equireann.cli import check_writable, override_typo_message, startup_error_message, user_errors
from pyg_equireann.cli.train import run as train_run
from pyg_equireann.training.prepare import trainer_adjustments

from .test_pipeline import BIN, TINY, cli, cli_env, compose_train, hydra_app

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.num_channels=8", "model.num_radial=8"]  # the default model, smaller
EPOCH_LINE = re.compile(r"epoch \d+.* \| lr [0-9.e+-]+ \| train loss .* \| val MAE E [0-9.]+ meV F [0-9.]+ meV/Å "
                        r"\| elapsed \d+:\d\d:\d\d")


@pytest.fixture(autouse=True)
def _isolate():
    """No global Hydra instance; float32 by default as in the CLIs (conftest sets float64); torch's thread
    count restored (runs here use ``num_threads=1``)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def epoch_lines(text):
    return [line for line in text.splitlines() if EPOCH_LINE.search(line)]


def start(name, *args, cwd):
    return subprocess.Popen([str(BIN / name), *args], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def unwritable_dir(tmp_path):
    """An existing folder in which no file can be created, also by root (tests run as root in CI, and
    root ignores permission bits): ``chmod 555`` where that is enough, else ``chattr +i`` (immutable),
    else a folder of the read-only sysfs. Verified by trying to create a file."""
    folder = tmp_path / "readonly"
    folder.mkdir()

    def writable(path):
        try:
            with tempfile.TemporaryFile(dir=path):
                return True
        except OSError:
            return False

    folder.chmod(0o555)
    if writable(folder) and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if writable(folder):
        folder = Path("/sys/kernel")  # sysfs: no regular files can be created, not even by root
    assert not writable(folder), "found no way to make a folder unwritable here"
    yield folder
    if folder.is_relative_to(tmp_path):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


# --------------------------------------------------------------------------- 13 + 11: epoch lines, stop reason


def test_epoch_lines_and_budget_stop_outside_a_terminal(tmp_path):
    """stdout is a pipe (as under nohup, SLURM or ``| tee``): one line per epoch in train.log and on stdout,
    no progress bar, a line saying that the budget stopped training and the final test table. The experiment sets
    ``trainer.max_epochs: 1`` and a budget: the budget lifts the cap (before: stopped after 1 epoch)."""
    experiment = tmp_path / "conf" / "experiment" / "capped.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\ntrainer:\n  max_epochs: 1\nbudget:\n  minutes: 0.01\n")
    run_dir = tmp_path / "run"
    quiet_not_set = [a for a in TINY if "progress_bar" not in a]  # the progress bar is on in conf/trainer
    r = cli("equireann-train", *SMALL, *quiet_not_set,
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=capped", f"hydra.run.dir={run_dir}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["epochs"] > 1, summary
    assert summary["stop_reason"].startswith("the training budget was used"), summary
    log = (run_dir / "train.log").read_text()
    for text in (log, r.stdout):
        assert len(epoch_lines(text)) == summary["epochs"], text
        assert f"training stopped after {summary['epochs']} epochs: the training budget was used (0.01 of 0.01 CPU" in text
    assert "epoch 0 | budget" in log  # no "/<max>": the epoch cap is lifted
    assert "test metrics (best.ckpt)" in log and "| test/forces_mae |" in log  # the final table, in the log too
    assert r.stdout.count("| test/forces_mae |") == 1  # and once on stdout
    assert "\r" not in r.stdout and "it/s" not in r.stdout + r.stderr  # no progress bar outside a terminal


def test_cap_on_command_line_stops_before_budget_and_terminal_gets_no_epoch_lines(tmp_path):
    """``trainer.max_epochs`` given on the command line keeps its cap and the stop line says that it ended
    training before the budget was used. With a progress bar on a terminal (a real pseudo-terminal), the
    epoch lines go to train.log only; the stop line goes to both."""
    import logging

    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w")
    handler = logging.StreamHandler(terminal)

    def task(cfg):
        logging.getLogger().addHandler(handler)  # after Hydra has configured logging
        try:
            return train_run(cfg)
        finally:
            logging.getLogger().removeHandler(handler)
            terminal.flush()

    run_dir = tmp_path / "run"
    hydra_app([*SMALL, *TINY, "trainer.enable_progress_bar=true", "test=false", "trainer.max_epochs=2",
               "budget.minutes=10", f"hydra.run.dir={run_dir}"], task)
    shown = os.read(master, 1 << 16).decode()
    terminal.close()
    os.close(master)
    log = (run_dir / "train.log").read_text()
    stop = ("training stopped after 2 epochs: trainer.max_epochs=2 was reached before the budget was used "
            "(0.0")
    assert len(epoch_lines(log)) == 2 and "epoch 1/1 | budget" in log and stop in log, log
    assert epoch_lines(shown) == [] and stop in shown, shown
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["epochs"] == 2 and "given on the command line" in summary["stop_reason"]


class LearningRates(Callback):
    """Records the learning rate of every training step (class attribute ``seen``)."""
    seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        LearningRates.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_budget_in_epochs(tmp_path):
    """``budget.epochs``: the cap of the trainer config is lifted, training stops after exactly that many epochs
    (the same optimiser steps on any machine), the budget's cosine runs over those steps and ends at min_lr, the
    stop line and summary say so; a resume keeps the step count. Minutes and epochs together: a one-line error,
    exit 2."""
    run_dir = tmp_path / "run"

    def task(cfg):
        with user_errors():
            return train_run(cfg)

    LearningRates.seen = []
    hydra_app([*SMALL, *TINY, "test=false", "budget.epochs=3", "budget.cosine_lr=true", "module.scheduler=none",
               "module.lr=0.01", "budget.min_lr=1e-4", "data.batch_size=5",
               f"+callbacks.lr._target_={__name__}.LearningRates", f"hydra.run.dir={run_dir}"], task)
    lrs = LearningRates.seen
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == 12 and summary["budget_epochs"] == 3, summary
    assert summary["budget_minutes"] is None and summary["training_minutes"] > 0
    assert summary["stop_reason"].startswith("the training budget was used (3 of 3 epochs ("), summary
    assert len(lrs) == 12 and lrs[0] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 11 / 12)))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))

    # resumed with a larger budget (an allowed override): the step count goes on, one more epoch, the cosine
    # now over 16 steps from step 12
    LearningRates.seen = []
    hydra_app([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "budget.epochs=4",
               f"++callbacks.lr._target_={__name__}.LearningRates"], task)  # a class the record names: repeated
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["epochs"] == 4 and summary["steps"] == 16, summary
    cosine = [1e-4 + (0.01 - 1e-4) * 0.5 * (1 + math.cos(math.pi * step / 16)) for step in range(12, 16)]
    assert LearningRates.seen == pytest.approx(cosine)

    with pytest.raises(SystemExit) as exit_info:
        hydra_app([*SMALL, *TINY, "budget.epochs=3", "budget.minutes=1", f"hydra.run.dir={tmp_path / 'both'}"], task)
    assert exit_info.value.code == 2
    log = (tmp_path / "both" / "train.log").read_text()
    assert "minutes or in epochs, not both" in log, log


@pytest.mark.parametrize("overrides, lifted", [
    (["budget.minutes=5"], True),
    (["budget.epochs=5"], True),
    (["experiment=quick"], True),  # the budget comes from the experiment
    (["budget.minutes=5", "trainer.max_epochs=7"], False),  # given on the command line
    (["experiment=cu_emt", "budget.minutes=5"], False),  # module.scheduler=cosine anneals over the epochs
    ([], False),  # no budget
])
def test_budget_lifts_the_epoch_cap(overrides, lifted, tmp_path):
    adjust = trainer_adjustments(compose_train(overrides, tmp_path))
    assert (adjust.get("max_epochs") == -1) is lifted


class InterruptAfterFirstEpoch(Callback):
    """Sends this process a real SIGINT (Ctrl+C) at the end of the first epoch."""

    def on_train_epoch_end(self, trainer, pl_module):
        signal.raise_signal(signal.SIGINT)


def test_interrupt_is_logged(tmp_path):
    """Ctrl+C: Lightning shuts down and exits with 1; train.log says that training was interrupted."""
    handler = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    # Python's own Ctrl+C handler, also when the test runner was started with SIGINT ignored (`cmd &` in a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):
            hydra_app([*SMALL, *TINY, "trainer.max_epochs=5", f"hydra.run.dir={run_dir}",
                       f"+callbacks.interrupt._target_={__name__}.InterruptAfterFirstEpoch"], train_run)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first one
    log = (run_dir / "train.log").read_text()
    assert len(epoch_lines(log)) == 1 and "training stopped in epoch 0: interrupted (Ctrl+C / SIGINT)" in log, log


def test_failure_text_in_train_log(tmp_path):
    """A user error (one line) and an unexpected error (its traceback) are written into train.log, not only
    onto the terminal."""
    run_dir = tmp_path / "user"

    def task(cfg):
        with user_errors():
            return train_run(cfg)

    with pytest.raises(SystemExit) as exit_info:
        hydra_app([*TINY, "data.molecule=benzene", f"hydra.run.dir={run_dir}"], task)
    assert exit_info.value.code == 2
    log = (run_dir / "train.log").read_text()
    assert "error: rMD17 files for 'benzene'" in log, log

    run_dir = tmp_path / "crash"
    with pytest.raises(Exception, match="bogus_flag"):
        hydra_app([*SMALL, *TINY, "+trainer.bogus_flag=1", f"hydra.run.dir={run_dir}"], task)
    log = (run_dir / "train.log").read_text()
    assert "failed" in log and "Traceback (most recent call last)" in log and "bogus_flag" in log, log


def test_unknown_schedule_is_a_one_line_error(tmp_path, capsys):
    """``module.scheduler`` picks the ``_partial_`` schedule config through a resolver; a name it does not know
    ends the run before any data is read with one line naming the key, not OmegaConf's multi-line message."""
    def task(cfg):
        with user_errors():
            return train_run(cfg)

    with pytest.raises(SystemExit) as exit_info:
        hydra_app([*TINY, "module.scheduler=cosin", f"hydra.run.dir={tmp_path / 'run'}"], task)
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: module.lr_scheduler: scheduler must be 'plateau', 'cosine' or 'none', got 'cosin'"]


# --------------------------------------------------------------------------- 5: unwritable output folders


def test_unwritable_output_folders_are_one_line_errors(tmp_path, unwritable_dir):
    """Checked before any data is read: an existing unwritable run folder (Hydra cannot write train.log;
    a folder that cannot be created is checked the same way, see test_check_writable), an unwritable checkpoint folder (before: found after the first epoch),
    the eval folder of equireann-eval and the output of equireann-export. Exit code 2, one error line
    naming the folder, no traceback."""
    cases = {
        "train, unwritable run folder": (
            "equireann-train", [*TINY, f"hydra.run.dir={unwritable_dir}"], str(unwritable_dir)),
        "train, unwritable checkpoints": (
            "equireann-train", [*TINY, f"hydra.run.dir={tmp_path}/run",
                                f"callbacks.checkpoint.dirpath={unwritable_dir}/checkpoints"],
            f"checkpoint folder (dirpath) {unwritable_dir}/checkpoints"),
        "eval, unwritable eval folder": (
            "equireann-eval", [f"ckpt_path={tmp_path}/x.ckpt", f"hydra.run.dir={unwritable_dir}/eval"],
            f"{unwritable_dir}/eval"),
        "export, unwritable output": (
            "equireann-export", [f"ckpt_path={tmp_path}/x.ckpt", f"out={unwritable_dir}/model.pt"],
            f"export folder {unwritable_dir}"),
    }
    procs = {case: start(name, *args, cwd=tmp_path) for case, (name, args, _) in cases.items()}
    for case, (_, _, named) in cases.items():
        _, stderr = procs[case].communicate(timeout=300)
        assert procs[case].returncode == 2, (case, stderr[-2000:])
        assert "Traceback" not in stderr, (case, stderr)
        (line,) = error_lines(stderr)
        assert named in line and ("not writable" in line or "cannot be created" in line), (case, line)
    assert not (tmp_path / "run" / "logs").exists()  # nothing trained


def test_check_writable(tmp_path, unwritable_dir):
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # probed, not created
    with pytest.raises(PermissionError, match="is not writable"):
        check_writable(unwritable_dir / "sub", "checkpoint folder")
    (tmp_path / "f").write_text("")
    with pytest.raises(PermissionError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "sub")


def test_console_scripts_import_torch_only_after_hydra():
    """Every CLI module and the package import without torch, torch_geometric or Lightning (~7 s), which are
    imported once Hydra has composed the config and the output folders are checked: a mistyped override or an
    unwritable folder costs about a second. The package's public names still import on first use."""
    code = ("import sys, pyg_equireann, pyg_equireann.cli.train, pyg_equireann.cli.evaluate, pyg_equireann.cli.export, "
            "pyg_equireann.cli.bench, pyg_equireann.cli.nonlocal_suite\n"
            "heavy = [m for m in ('torch', 'torch_geometric', 'lightning') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "from pyg_equireann import EquiREANN, energy_forces_stress\n"
            "import pyg_equireann.models.equireann as m\n"
            "assert EquiREANN is m.EquiREANN and 'torch' in sys.modules\n")
    result = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, env=cli_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- 15: mistyped overrides


def test_typo_overrides_name_the_closest_key(tmp_path):
    """Every equireann-* CLI (they share the entry point): one line with the closest key or choice, exit 2."""
    cases = {
        ("equireann-train", "model.cutof=3"): "did you mean model.cutoff=3?",
        ("equireann-eval", "ckpt_pth=x.ckpt"): "did you mean ckpt_path=x.ckpt?",
        ("equireann-export", "dtyp=float32"): "did you mean dtype=float32?",
    }
    procs = {case: start(case[0], case[1], "hydra.run.dir=.", cwd=tmp_path) for case in cases}
    for case, hint in cases.items():
        _, stderr = procs[case].communicate(timeout=300)
        assert procs[case].returncode == 2, (case, stderr[-2000:])
        (line,) = error_lines(stderr)
        assert hint in line and "Traceback" not in stderr and "+" not in line, (case, stderr)


@pytest.mark.parametrize("key, overrides, hint", [
    ("model.cutof", ["model.cutof=3"], "did you mean model.cutoff=3?"),
    ("modl", ["modl=reann"], "did you mean model=reann?"),  # a config group
    ("sed", ["sed=1"], "did you mean seed=1?"),
    ("trainer.max_epoch", ["model=schnet", "trainer.max_epoch=3"], "did you mean trainer.max_epochs=3?"),
    ("model.hidden_chanels", ["model=schnet", "model.hidden_chanels=8"], "model.hidden_channels=8?"),
    ("hydra.run.dri", ["hydra.run.dri=x"], "did you mean hydra.run.dir=x?"),
    ("model.zzzzzz", ["model.zzzzzz=1"], "the keys of model are: _target_, cutoff,"),
])
def test_override_typo_message(key, overrides, hint):
    message = override_typo_message(key, "train", overrides)
    assert message.startswith(f"Could not override {key!r}: no such key") and hint in message, message


def test_unknown_config_choice_lists_the_choices():
    """``model=equirean`` (Hydra's MissingConfigException, raised by real composition)."""
    from hydra import compose, initialize_config_dir

    from pyg_equireann.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(Exception) as error:
            compose("train", overrides=["model=equirean"])
    message = startup_error_message(error.value, "train", ["model=equirean"])
    assert message.startswith("no config 'equirean' in group model: did you mean model=equireann? (choices: "), message
    assert "reann, schnet" in message and "\n" not in message


# --------------------------------------------------------------------------- 13: run_md progress


def test_run_md_prints_progress(capsys):
    spec = importlib.util.spec_from_file_location("run_md", ROOT / "examples" / "run_md.py")
    run_md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_md)
    run_md.main(["--system", "ethanol", "--steps", "12", "--interval", "4", "--progress", "4"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" (")[0] for line in lines] == ["step 4/12", "step 8/12", "step 12/12"]
    assert all(re.search(r"\| [0-9.]+ s \| T [0-9.]+ K \| E_total - E_total\(0\) [+-][0-9.]+ meV/atom$", line)
               for line in lines), lines
