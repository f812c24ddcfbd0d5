"""Tests of the benchmark suite (``equireann-bench``): every model trains through the same Lightning
module, the speed harness produces complete tables on tiny systems, the MACE wrapper is a correct
periodic potential, and the report generator writes its Markdown, CSV and PNG files. No timing is
asserted: only shapes, files and physics."""
import csv
import json
import os

import lightning as L
import pytest
import torch

from pyg_equireann.experiments.bench import run_bench
from pyg_equireann.experiments.bench.accuracy import last_epoch_fit, validation_curve
from pyg_equireann.experiments.bench.report import (accuracy_markdown, accuracy_rows, learning_curve_plot,
                                                    speed_markdown, speed_plot, step_curve_plot, write_csv)
from pyg_equireann.experiments.bench.speed import energy_and_forces, is_out_of_memory, peak_memory, run_speed
from pyg_equireann.experiments.bench.systems import aspirin_batch, build_system, water_box
from pyg_equireann.experiments.harness import compose, model_configs
from pyg_equireann.training.prepare import prepare_model_config

from .test_pipeline import BIN, SMALL, cli_env, compose_train, ethanol_datamodule, make_module

ALL_MODELS = list(SMALL)


def small_config(name):
    """conf/model/<name>.yaml with the small sizes used in the pipeline tests."""
    overrides = {}
    for item in SMALL[name]:
        key, value = item.split("=", 1)
        overrides[key.split(".", 1)[1]] = json.loads(value) if value.startswith("[") else _number(value)
    return model_configs([name], {name: overrides})[name]


def _number(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_model_takes_a_training_step_through_the_same_module(model, tmp_path):
    """A real Lightning Trainer runs one training and one validation batch of each model config through
    PotentialModule; the loss is finite and the optimiser changed the parameters."""
    torch.manual_seed(0)
    dm = ethanol_datamodule(batch_size=4)
    config = prepare_model_config(compose_train([f"model={model}", *SMALL[model]], tmp_path).model, dm)
    module = make_module(config, dm, lr=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/forces_mae" in trainer.callback_metrics
    # (EquiREANN's output layers start at zero, so one step moves only those; any change proves the step ran)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    assert changed >= 1


def test_mace_wrapper_is_an_invariant_periodic_potential():
    """MACE through the wrapper: rotation invariance, forces = −∇E (finite differences), and a periodic
    box equals half of its 2×1×1 supercell (the shift convention of MACE's edges is right)."""
    from pyg_equireann.training.module import build_model

    torch.manual_seed(0)
    config = dict(small_config("mace"), elements=[1, 8], avg_num_neighbors=8.0, cutoff=3.0)
    model = build_model(config).double()
    with torch.no_grad():  # non-zero readouts so the test is not trivially passed by a zero energy
        for name, p in model.named_parameters():
            if "readout" in name:
                p.normal_(0.0, 0.5)
    box = water_box(20, seed=1)
    z, pos, cell, pbc = box["z"], box["pos"], box["cell"], box["pbc"]
    energy, forces = energy_and_forces(model, box)
    assert abs(float(energy)) > 1e-6
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    rotated = dict(box, pos=pos @ q.T, cell=cell @ q.T)
    energy_rot, forces_rot = energy_and_forces(model, rotated)
    assert torch.allclose(energy_rot, energy, rtol=1e-9, atol=1e-9)
    assert torch.allclose(forces_rot, forces @ q.T, atol=1e-8)
    i, eps = 4, 1e-5
    for d in range(3):
        plus, minus = pos.clone(), pos.clone()
        plus[i, d] += eps
        minus[i, d] -= eps
        e_plus = model(z, plus, None, cell, pbc).detach()
        e_minus = model(z, minus, None, cell, pbc).detach()
        assert float(-(e_plus - e_minus) / (2 * eps)) == pytest.approx(float(forces[i, d]), abs=1e-6)
    double_cell = cell.clone()
    double_cell[0, 0] *= 2
    supercell = {"z": torch.cat([z, z]), "pos": torch.cat([pos, pos + cell[0, 0]]),
                 "batch": torch.zeros(2 * len(z), dtype=torch.long), "cell": double_cell, "pbc": pbc, "num_graphs": 1}
    energy_super, _ = energy_and_forces(model, supercell)
    e0 = model.atomic_energies[z].sum() + model.energy_shift.double() * len(z)
    assert float(energy_super - 2 * e0) == pytest.approx(2 * float(energy - e0), rel=1e-9)


def test_mace_import_leaves_torch_load_safe():
    """mace-torch's own import sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for the whole process; ours does not."""
    from pyg_equireann.models.mace import import_mace

    import_mace()
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_systems():
    asp = aspirin_batch(3)
    assert asp["z"].shape == (63,) and asp["pos"].shape == (63, 3) and asp["num_graphs"] == 3
    assert asp["batch"].tolist() == [0] * 21 + [1] * 21 + [2] * 21
    box = build_system("water1000")
    n = len(box["z"])
    assert 900 <= n <= 1100 and (box["z"] == 8).sum() * 3 == n
    volume = float(torch.det(box["cell"][0]))
    assert volume / (n / 3) == pytest.approx(29.9, rel=1e-6)  # 1 g/cm³
    assert bool(box["pbc"].all())
    with pytest.raises(ValueError, match="unknown benchmark system"):
        build_system("benzene")


def test_speed_harness_tables_on_tiny_systems(tmp_path):
    """The speed table has one row per (system, dtype, model) with every column; models without periodic
    support are reported as n/a; the Markdown, CSV and plot are written."""
    configs = {name: small_config(name) for name in ("equireann", "schnet", "mace")}
    systems = {"aspirin2": aspirin_batch(2), "water30": water_box(30)}
    rows = run_speed(configs, systems, dtypes=["float32", "float64"], repeats=2, warmup=1, max_seconds=30,
                     memory=False, progress=False)
    assert len(rows) == 2 * 2 * 3
    by_key = {(r["system"], r["dtype"], r["model"]): r for r in rows}
    for dtype in ("float32", "float64"):
        assert by_key[("water30", dtype, "schnet")]["status"] == "n/a"
        for model in ("equireann", "mace"):
            row = by_key[("water30", dtype, model)]
            assert row["status"] == "ok" and row["ms_per_structure"] > 0 and row["repeats"] == 2
        ref = by_key[("aspirin2", dtype, "equireann")]
        assert ref["ratio_to_reference"] == pytest.approx(1.0)
        assert ref["us_per_atom"] == pytest.approx(1e3 * ref["ms_per_structure"] * 2 / 42)
    assert all(r["parameters"] > 0 for r in rows)
    table = speed_markdown(rows)
    assert table.count("| equireann |") == 4 and "n/a" in table
    write_csv(rows, tmp_path / "speed.csv")
    with open(tmp_path / "speed.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert speed_plot(rows, tmp_path / "speed.png").stat().st_size > 1000


class OutOfMemoryAbove(torch.nn.Module):
    """A periodic toy potential whose forward runs out of (CUDA) memory with more than ``max_atoms`` atoms or
    from its ``max_calls``-th call on."""

    supports_pbc = True

    def __init__(self, max_atoms: int = 10**9, max_calls: int = 10**9):
        super().__init__()
        self.max_atoms, self.max_calls, self.calls = max_atoms, max_calls, 0
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, z, pos, batch=None, cell=None, pbc=None):
        self.calls += 1
        if len(z) > self.max_atoms or self.calls >= self.max_calls:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({len(z)} atoms)")
        return (self.weight * pos.square().sum()).view(1)


def test_speed_bench_reports_out_of_memory_and_goes_on():
    """A model that runs out of memory (in its warm-up call at 81 atoms, or in a timed call) is reported as
    OOM and not run on the larger box; EquiREANN's rows stay complete. Allocation failures of other
    allocators count as out of memory, other errors do not."""
    toy = f"{__name__}.OutOfMemoryAbove"
    configs = {"equireann": small_config("equireann"), "oom_large": {"_target_": toy, "max_atoms": 50},
               "oom_late": {"_target_": toy, "max_calls": 3}}
    systems = {f"water{n}": water_box(n) for n in (30, 100, 300)}  # 24, 81 and 375 atoms
    rows = run_speed(configs, systems, repeats=3, warmup=1, max_seconds=30, memory=False, progress=False)
    by_key = {(r["system"], r["model"]): r for r in rows}
    assert by_key[("water30", "oom_large")]["status"] == "ok"
    assert by_key[("water100", "oom_large")]["status"] == "OOM"
    assert "out of memory" in by_key[("water100", "oom_large")]["note"]
    assert by_key[("water300", "oom_large")]["note"] == "not run: out of memory at 81 atoms"
    for system in systems:
        assert by_key[(system, "oom_late")]["status"] == "OOM"
        row = by_key[(system, "equireann")]
        assert row["status"] == "ok" and row["repeats"] == 3 and row["ms_per_structure"] > 0
        assert row["ratio_to_reference"] == pytest.approx(1.0)
    table = speed_markdown(rows)
    assert "| oom_large | 1 | OOM: OutOfMemoryError: CUDA out of memory" in table
    assert table.count("| equireann | ") == 3 and table.count("OOM") == 5
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_train_step_bench_table(tmp_path):
    """``bench=train_step`` with two models (one a variant of a model config) at batch 2 on a tiny ethanol
    training set: one row per (batch size, model) with finite positive times, the Markdown and CSV files."""
    cfg = compose("bench", ["bench=train_step", "models=[equireann_small,schnet]", "train_step.dataset=ethanol",
                            "train_step.data_overrides=['data.num_train=12','data.num_val=4','data.num_test=4']",
                            "train_step.batch_sizes=[2]", "train_step.repeats=3", "train_step.warmup=1",
                            "train_step.float64=true", "+variants.equireann_small.model=equireann",
                            "+variants.equireann_small.num_channels=8", "reference=equireann_small"])
    cfg.train_step.model_overrides = {"schnet": {"hidden_channels": 16, "num_filters": 16, "num_interactions": 2,
                                                 "num_gaussians": 16, "cutoff": 4.0}}  # one data module
    report = run_bench(cfg, tmp_path)
    with open(tmp_path / "train_step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["equireann_small", "schnet"]
    for row in rows:
        assert row["status"] == "ok" and row["batch_size"] == "2" and row["repeats"] == "3"
        assert float(row["atoms_per_step"]) == 18.0 and int(row["parameters"]) > 0
        for column in ("ms_per_step", "ms_per_step_min", "structures_per_s", "ratio_to_reference",
                       "ratio_to_reference_min"):
            assert 0 < float(row[column]) < float("inf"), column
        assert float(row["structures_per_s"]) == pytest.approx(2e3 / float(row["ms_per_step"]))
        assert row["peak_mb"] == ""  # CPU: not measured
    assert float(rows[0]["ratio_to_reference"]) == float(rows[0]["ratio_to_reference_min"]) == 1.0
    text = report.read_text()
    assert "## Training step" in text and "| equireann_small | " in text and "Step time at batch 2: schnet /" in text
    assert (tmp_path / "train_step.md").read_text() in text


def test_peak_memory_in_a_fresh_process():
    memory = peak_memory(small_config("equireann"), [1, 6, 8], 10.0, aspirin_batch(2), torch.float32)
    assert "error" not in memory, memory
    assert 50 < memory["rss_mb"] < 8000 and 0 <= memory["rss_increase_mb"] < memory["rss_mb"]


def test_accuracy_report_files(tmp_path):
    runs = [{"dataset": "aspirin", "model": "equireann", "parameters": 1000, "epochs": 3, "steps": 600,
             "training_minutes": 1.0, "last_epoch/train/forces_mae": 21.5,
             "test/energy_mae": 10.0, "test/energy_rmse": 12.0, "test/forces_mae": 50.0, "test/forces_rmse": 70.0},
            {"dataset": "acac", "model": "mace", "parameters": 2000, "epochs": 2, "training_minutes": 1.0,
             "test/300K/forces_mae": 30.0, "test/600K/forces_mae": 60.0},
            {"dataset": "aspirin", "model": "schnet", "error": "boom"}]
    rows = accuracy_rows(runs)
    assert [(r["dataset"], r["test_set"]) for r in rows] == [("aspirin", "test"), ("acac", "300K"), ("acac", "600K"),
                                                              ("aspirin", "–")]
    text = accuracy_markdown(rows)
    assert "| aspirin | test | equireann | 1,000 | 3 | 600 | 1 | 10 | 12 | 50 | 70 | 21.5 |" in text
    assert "| acac | 300K | mace | 2,000 | 2 | – | 1 | – | – | 30 | – | – |" in text and "failed: boom" in text
    curves = {"equireann": [{"minutes": 0.5, "forces_mae": 80.0}, {"minutes": 1.0, "forces_mae": 50.0}]}
    assert learning_curve_plot(curves, tmp_path / "lc.png", "aspirin").stat().st_size > 1000


def test_validation_curve_against_optimiser_steps(tmp_path):
    """Learning per step: the validation rows of a run's Lightning CSV log (training-only and test rows skipped)."""
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/forces_mae", "val/energy_mae", "test/forces_mae"])
        writer.writerows([[0, 9, 1.0, "", "", ""], [0, 9, "", 80.0, 30.0, ""], [1, 19, "", 50.0, 20.0, ""],
                          [1, 19, "", "", "", 55.0]])
    curve = validation_curve(tmp_path)
    assert curve == [{"step": 9, "epoch": 0, "forces_mae": 80.0, "energy_mae": 30.0},
                     {"step": 19, "epoch": 1, "forces_mae": 50.0, "energy_mae": 20.0}]
    assert validation_curve(tmp_path / "missing") == []
    assert step_curve_plot({"equireann": curve}, tmp_path / "steps.png", "aspirin").stat().st_size > 1000


def test_last_epoch_fit_against_validation(tmp_path):
    """The generalisation columns: the last logged training-batch and validation metrics of a run's CSV log."""
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "logs" / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/forces_mae", "train/energy_mae", "val/forces_mae", "test/forces_mae"])
        writer.writerows([[0, 9, 90.0, 40.0, "", ""], [0, 9, "", "", 80.0, ""], [1, 19, 12.0, 3.0, "", ""],
                          [1, 19, "", "", 50.0, ""], [1, 19, "", "", "", 55.0]])
    assert last_epoch_fit(tmp_path) == {"train/forces_mae": 12.0, "train/energy_mae": 3.0, "val/forces_mae": 50.0}
    assert last_epoch_fit(tmp_path / "missing") == {}


def test_bench_cli_quick_end_to_end(tmp_path):
    """``equireann-bench bench=quick`` with a tiny budget and data: trains through equireann-train, evaluates
    the budget snapshots and writes every report file."""
    out = tmp_path / "bench"
    args = ["bench=quick", "models=[equireann]", "datasets=[ethanol]", "speed.systems=[aspirin2]", "speed.repeats=2",
            "speed.warmup=1", "speed.memory=false", "budget.minutes=0.03", "budget.snapshots=[0.5,1.0]",
            "accuracy.jobs=1", "accuracy.curve_frames=5",
            "accuracy.dataset_overrides.ethanol=['data=rmd17','data.molecule=ethanol','data.num_train=20',"
            "'data.num_val=5','data.num_test=10','model.num_channels=8']", f"hydra.run.dir={out}"]
    proc = __import__("subprocess").run([str(BIN / "equireann-bench"), *args], env=cli_env(), capture_output=True,
                                        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("speed.md", "speed.csv", "speed.png", "accuracy.md", "accuracy.csv", "report.md",
                 "learning_curves_ethanol.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "accuracy" / "ethanol" / "equireann" / "train_summary.json").read_text())
    assert summary["training_minutes"] >= 0.03 and summary["budget_clock"] == "process"
    curves = json.loads((out / "accuracy" / "curves.json").read_text())["ethanol"]["equireann"]
    assert len(curves) == 2 and curves[0]["minutes"] < curves[1]["minutes"]
    with open(out / "accuracy.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["steps"]) == summary["steps"] > 0 and float(row["train_forces_mae"]) > 0
    report = (out / "report.md").read_text()
    assert "| ethanol | test | equireann |" in report and "| equireann |" in report


def test_model_configs_compose_group_defaults_and_name_unknown_models():
    """Model configs come from Hydra's composition (a file's defaults list included); an unknown name is one
    ValueError listing the available configs."""
    configs = model_configs(["equireann_nopassing", "schnet"], {"schnet": {"cutoff": 4.0}})
    assert configs["equireann_nopassing"]["equivariant_passing"] is False
    assert configs["equireann_nopassing"]["num_channels"] == 36  # from equireann.yaml, its default
    assert configs["schnet"]["interaction_graph"]["cutoff"] == 4.0  # ${..cutoff} resolved after the override
    with pytest.raises(ValueError, match="unknown model 'nope'.*equireann"):
        model_configs(["nope"])
