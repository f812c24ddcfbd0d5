"""One evaluation path: ``equireann-eval`` (:func:`~pyg_equireann.training.evaluation.evaluate_sets`) and the
validation/test steps of :class:`~pyg_equireann.training.module.PotentialModule` accumulate the same errors."""
from pathlib import Path

import ase.io
import lightning as L
import numpy as np
import pytest
import torch

from pyg_equireann.datamodules.xyz import XYZDataModule
from pyg_equireann.training.evaluation import evaluate_sets, metrics_table
from pyg_equireann.training.module import PotentialModule

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def cu(tmp_path_factory):
    """6 Cu EMT frames with stress, training on 2, testing on 4 of two config types, a random-init model."""
    d = tmp_path_factory.mktemp("eval")
    frames = ase.io.read(DATA / "cu_emt" / "train.xyz", index=":6")
    for k, atoms in enumerate(frames):
        atoms.info["config_type"] = "hot" if k % 2 else "cold"
    ase.io.write(d / "train.xyz", frames[:2], format="extxyz")
    ase.io.write(d / "test.xyz", frames[2:], format="extxyz")
    dm = XYZDataModule(d / "train.xyz", test_files={"cu": str(d / "test.xyz")}, val_fraction=0.0, cutoff=3.0,
                       batch_size=2, eval_batch_size=3, dtype="float64", progress=False)
    dm.setup("fit")
    torch.manual_seed(0)
    module = PotentialModule(model={"_target_": "pyg_equireann.EquiREANN", "cutoff": 3.0, "num_channels": 4,
                                    "max_l": 1, "num_radial": 4, "elements": dm.elements})
    s = dm.statistics
    module.model.set_energy_statistics(atomic_energies=s["atomic_energies"], scale=s["scale"], shift=s["shift"])
    return dm, module.double().eval()


def test_eval_metrics_are_the_trainer_test_metrics(cu):
    """Before: equireann-eval computed its metrics in numpy from per-structure rows (no stress, float32 force
    errors for float32 models), apart from the module's accumulator used by trainer.test."""
    dm, module = cu
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False)
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert dm.test_config_types == {"cu": ["cold", "hot"]}
    results, metrics = evaluate_sets(module, dict(zip(dm.test_names, dm.test_dataloader())), dm.test_config_types)
    assert {f"test/{k}" for k in metrics} == set(tested) - {"test/cu/loss"}
    assert {"cu/stress_mae", "cu/config_type=hot/forces_rmse", "cu/config_type=cold/energy_per_atom_mae"} <= set(metrics)
    for key, value in metrics.items():
        assert value == pytest.approx(float(tested[f"test/{key}"]), rel=1e-6), key  # Lightning logs float32
    # meV of the per-structure energies (eV) and per-atom energies
    r = results["cu"]
    e = (r["energy_pred"] - r["energy_ref"]) * 1e3
    assert metrics["cu/energy_mae"] == pytest.approx(np.abs(e).mean(), rel=1e-12)
    assert metrics["cu/energy_per_atom_rmse"] == pytest.approx(np.sqrt(((e / r["natoms"]) ** 2).mean()), rel=1e-12)
    hot = r["config_type"] == 1
    assert metrics["cu/config_type=hot/energy_mae"] == pytest.approx(np.abs(e[hot]).mean(), rel=1e-12)
    assert metrics["cu/forces_mae"] == pytest.approx(
        1e3 * np.abs(r["forces_pred"] - r["forces_ref"]).mean(), rel=1e-12)
    assert "| cu/stress_mae |" in metrics_table(metrics) and "meV/Å³" in metrics_table(metrics)
