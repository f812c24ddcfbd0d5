import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.nn.models import SchNet

from pyg_equireann import EquiREANN, compute_statistics, radius_graph
from pyg_equireann.models.pyg import RadiusInteractionGraph
from pyg_equireann.training.module import PotentialModule

from .conftest import load_rmd17, random_rotation


def test_compute_statistics_recovers_reference_energies():
    gen = torch.Generator().manual_seed(0)
    e0 = {1: -13.6, 6: -1030.5, 8: -2041.2}
    frames = []
    for _ in range(30):
        n_h, n_c, n_o = (int(torch.randint(1, 6, (1,), generator=gen)) for _ in range(3))
        z = torch.tensor([1] * n_h + [6] * n_c + [8] * n_o)
        pos = torch.randn(len(z), 3, generator=gen) * 2
        energy = sum(e0[int(a)] for a in z) + 0.01 * float(torch.randn(1, generator=gen))
        frames.append(Data(z=z, pos=pos, energy=torch.tensor([energy]), forces=torch.full((len(z), 3), 0.5)))
    stats = compute_statistics(frames, cutoff=3.0)
    for zz, value in e0.items():
        assert stats["atomic_energies"][zz] == pytest.approx(value, abs=0.02)
    assert stats["scale"] == pytest.approx(0.5)
    assert abs(stats["shift"]) < 0.01
    edges = sum(radius_graph(f.pos, 3.0).shape[1] for f in frames)
    assert stats["avg_num_neighbors"] == pytest.approx(edges / sum(len(f.z) for f in frames))
    with pytest.raises(KeyError, match="energy"):
        compute_statistics([Data(z=torch.tensor([1]), pos=torch.zeros(1, 3))], cutoff=3.0)
    with pytest.raises(KeyError, match=r"\[8\]"):
        compute_statistics(frames, cutoff=3.0, atomic_energies={1: 0.0, 6: 0.0})


def test_schnet_runs_with_compiled_free_interaction_graph():
    z, coords, _, _ = load_rmd17("ethanol", slice(0, 2))
    torch.manual_seed(0)
    model = SchNet(hidden_channels=16, num_filters=16, num_interactions=2, cutoff=5.0,
                   interaction_graph=RadiusInteractionGraph(5.0)).double()
    batch = torch.arange(2).repeat_interleave(len(z))
    energy = model(z.repeat(2), coords.reshape(-1, 3), batch)
    R = random_rotation(0)
    rotated = model(z.repeat(2), coords.reshape(-1, 3) @ R.T, batch)
    assert energy.shape == (2, 1)
    assert torch.allclose(energy, rotated, rtol=1e-10)


def test_float32_model_sums_energies_in_float64():
    model = EquiREANN(elements=[1, 6, 8]).float()
    model.set_energy_statistics({1: -13.123456789, 6: -1029.987654321, 8: -2041.5}, scale=1.0, shift=0.0)
    assert model.atomic_energies.dtype == torch.float64
    z, coords, _, _ = load_rmd17("ethanol", slice(0, 1))
    with torch.no_grad():
        energy = model(z, coords[0].float())
    assert energy.dtype == torch.float64
    with torch.no_grad():
        readout = model.compute(z, coords[0].float())["atomic_energies"] - model.atomic_energies[z]
    expected = 2 * -1029.987654321 + -2041.5 + 6 * -13.123456789
    assert float(energy - readout.sum()) == pytest.approx(expected, abs=1e-9)


def _module_from_conf(overrides):
    """conf/train.yaml's module (``_target_``, ``_partial_`` optimiser and schedule), as training/prepare.py builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pyg_equireann.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return instantiate(OmegaConf.to_container(cfg.module, resolve=True), _partial_=True)(model=TINY_MODEL)


TINY_MODEL = {"_target_": "pyg_equireann.EquiREANN", "elements": [1, 6, 8], "num_channels": 4, "max_l": 1,
              "num_radial": 4}


def _learning_rates(module, max_epochs, epochs=6):
    """The optimiser's class and lr at the start of each epoch (ReduceLROnPlateau: a validation loss that never
    improves), with a trainer of ``max_epochs``."""
    import types

    module._trainer = types.SimpleNamespace(max_epochs=max_epochs)
    config = module.configure_optimizers()
    optimizer, scheduler = (config["optimizer"], config["lr_scheduler"]["scheduler"]) if isinstance(config, dict) \
        else (config, None)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)
        elif scheduler is not None:
            scheduler.step()
    monitor = config["lr_scheduler"].get("monitor") if isinstance(config, dict) else None
    return type(optimizer).__name__, optimizer.defaults["amsgrad"], monitor, rates


@pytest.mark.parametrize("scheduler", ["plateau", "cosine", "none"])
def test_optimiser_and_schedule_configs_equal_the_string_options(scheduler):
    """conf/module/default.yaml's ``_partial_`` optimiser and schedule (chosen by ``module.scheduler``) give the
    same optimiser and learning rate per epoch as PotentialModule's string options (old checkpoints, Python
    callers); the hyperparameters hold their plain configs, not callables (checkpoints load weights_only)."""
    import io

    settings = dict(lr=0.01, scheduler=scheduler, warmup_epochs=2, plateau_patience=0, plateau_factor=0.5)
    module = _module_from_conf([f"module.{k}={v}" for k, v in settings.items()] + ["trainer.max_epochs=6"])
    legacy = PotentialModule(model=TINY_MODEL, **settings)
    assert _learning_rates(module, max_epochs=6) == _learning_rates(legacy, max_epochs=6)
    assert module.hparams.optimizer["_target_"].endswith("AdamW") and module.hparams.optimizer["lr"] == 0.01
    assert (module.hparams.lr_scheduler is None) == (scheduler == "none") and legacy.hparams.lr_scheduler is None
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    hparams = torch.load(buffer, weights_only=True)
    restored = PotentialModule(model=hparams.pop("model_config"), **hparams)  # as load_from_checkpoint does
    assert _learning_rates(restored, max_epochs=6) == _learning_rates(legacy, max_epochs=6)


def test_optimiser_configs_of_a_checkpoint_build_only_torch_optim():
    """A checkpoint's optimiser or schedule config is not trusted: only torch.optim classes and the package's
    schedules are built, and nothing nested in their arguments."""
    for config in ({"_target_": "os.system", "_partial_": True, "command": "true"},
                   {"_target_": "torch.optim.lr_scheduler.warnings.warn", "_partial_": True},
                   {"_target_": "builtins.eval"}, {"_target_": "torch.optim.NoSuchOptimizer"}):
        with pytest.raises(ValueError, match="only torch.optim"):
            PotentialModule(model=TINY_MODEL, optimizer=config)
    with pytest.raises(TypeError, match="functools.partial"):
        PotentialModule(model=TINY_MODEL, lr_scheduler=lambda optimizer: None)


class _OwnAdam(torch.optim.Adam):
    """An optimiser class of a user's own package."""


def test_own_optimiser_class_is_built_once_allowed():
    """An optimiser of one's own: given by code (a partial) it is used as it is; read from a checkpoint's
    config it is built once allowed with register_model_class."""
    import functools

    from pyg_equireann.training.checkpoint import register_model_class

    module = PotentialModule(model=TINY_MODEL, optimizer=functools.partial(_OwnAdam, lr=0.01))
    assert type(module.configure_optimizers()["optimizer"]) is _OwnAdam
    config = dict(module.hparams.optimizer)
    assert config == {"_target_": f"{__name__}._OwnAdam", "_partial_": True, "lr": 0.01}
    with pytest.raises(ValueError, match="register_model_class"):
        PotentialModule(model=TINY_MODEL, optimizer=config)
    register_model_class(_OwnAdam)
    optimizer = PotentialModule(model=TINY_MODEL, optimizer=config).configure_optimizers()["optimizer"]
    assert type(optimizer) is _OwnAdam and optimizer.defaults["lr"] == 0.01


def test_old_checkpoint_with_string_options_loads_with_its_schedule(tmp_path):
    """A checkpoint written before the optimiser and schedule were configs (hyperparameters: the string options,
    no ``optimizer``/``lr_scheduler``) loads with ``from_checkpoint`` and builds its optimiser and schedule."""
    old = PotentialModule(model=TINY_MODEL, lr=0.02, scheduler="cosine", warmup_epochs=1, min_lr=1e-4)
    hparams = {k: v for k, v in old.hparams.items() if k not in ("optimizer", "lr_scheduler")}
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.5.0"},
               tmp_path / "old.ckpt")
    loaded = PotentialModule.from_checkpoint(tmp_path / "old.ckpt")
    assert _learning_rates(loaded, max_epochs=4) == _learning_rates(old, max_epochs=4)
    assert _learning_rates(loaded, max_epochs=4)[3][:2] == [pytest.approx(0.002), pytest.approx(0.02)]


def test_checkpoint_naming_old_module_paths_loads(tmp_path):
    """Checkpoints written before the package was split into nn/, graph/, models/, training/ name their model
    classes by the old module paths (``pyg_equireann.equireann.EquiREANN``, ``pyg_equireann.pyg_compat...``):
    they load as the classes' new paths, with the same energies."""
    module = PotentialModule(model=TINY_MODEL)
    hparams = dict(module.hparams)
    hparams["model_config"] = {**TINY_MODEL, "_target_": "pyg_equireann.equireann.EquiREANN"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.5.0"},
               tmp_path / "old.ckpt")
    loaded = PotentialModule.from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.hparams.model_config["_target_"] == "pyg_equireann.models.equireann.EquiREANN"
    z, pos = torch.tensor([8, 1, 1]), torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    assert torch.equal(loaded.model(z, pos), module.model(z, pos))


def test_ema_warmup_follows_early_training_then_decays_at_the_set_rate():
    """The warmed-up EMA (decay min(d, (1+n)/(10+n)) after n updates) moves 90 % of the way to the weights at its
    first update and reaches the set decay d after (10d − 1)/(1 − d) updates; without warm-up it moves 1 − d;
    integer tensors are copied."""
    from pyg_equireann.training.callbacks import EMA, ema_multi_avg_fn

    def updated(n, warmup=True):
        ema = [torch.zeros(3), torch.zeros(2, 2)]
        ema_multi_avg_fn(0.99, warmup)(ema, [torch.ones(3), torch.ones(2, 2)], torch.tensor(n))
        return ema

    for n, moved in ((0, 0.9), (10_000, 0.01), (100, 1 - 101 / 110)):
        assert all(torch.allclose(t, torch.full_like(t, moved)) for t in updated(n))
    assert all(torch.allclose(t, torch.full_like(t, 0.01)) for t in updated(0, warmup=False))
    counts = [torch.zeros(2, dtype=torch.long)]
    ema_multi_avg_fn(0.99, True)(counts, [torch.tensor([3, 4])], torch.tensor(5))
    assert counts[0].tolist() == [3, 4]
    assert EMA(decay=0.99, warmup=True)._kwargs["multi_avg_fn"] is not None
    assert EMA(decay=0.99)._kwargs["avg_fn"] is None  # foreach updates in both cases


def test_ema_foreach_update_equals_the_per_parameter_average():
    """The EMA's AveragedModel (foreach updates over parameters and buffers, float and integer) gives the
    weights of the per-parameter formula ema + (w − ema)(1 − rate) after several updates."""
    from torch.optim.swa_utils import AveragedModel

    from pyg_equireann.training.callbacks import ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)).double()
    averaged = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.9, warmup=True), use_buffers=True)
    expected = None
    for n in range(5):
        model(torch.randn(16, 4, dtype=torch.float64)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        current = {k: v.clone() for k, v in model.state_dict().items()}
        if expected is None:
            expected = current
        else:
            rate = min(0.9, (1 + n) / (10 + n))  # n = AveragedModel.n_averaged: updates so far
            expected = {k: (v if not v.is_floating_point() else expected[k] + (v - expected[k]) * (1 - rate))
                        for k, v in current.items()}
        averaged.update_parameters(model)
    got = averaged.module.state_dict()
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-12), key


def test_energy_loss_per_atom_or_total():
    """module.energy_loss=total weighs the error of E itself (eV²), so an energy that does not grow with the
    structure (a chain's twist) keeps its weight in large structures; per_atom (the default) divides it by N."""
    from torch_geometric.data import Batch

    structures = [Data(z=torch.ones(n, dtype=torch.long), pos=torch.zeros(n, 3), energy=torch.tensor([e]),
                       forces=torch.zeros(n, 3)) for n, e in ((2, 1.0), (5, -2.0))]
    batch = Batch.from_data_list(structures)
    out = {"energy": torch.tensor([1.5, -1.0]), "forces": torch.full((7, 3), 0.1)}
    force_term = 100.0 * 0.01
    per_atom = PotentialModule(model=TINY_MODEL)
    assert per_atom.hparams.energy_loss == "per_atom"
    loss, _ = per_atom._loss_and_errors(batch, out)
    assert float(loss) == pytest.approx(((0.5 / 2) ** 2 + (1.0 / 5) ** 2) / 2 + force_term)
    total = PotentialModule(model=TINY_MODEL, energy_loss="total", energy_weight=2.0)
    loss, _ = total._loss_and_errors(batch, out)
    assert float(loss) == pytest.approx(2.0 * (0.5 ** 2 + 1.0 ** 2) / 2 + force_term)
    with pytest.raises(ValueError, match="module.energy_loss must be 'per_atom' or 'total', got 'sum'"):
        PotentialModule(model=TINY_MODEL, energy_loss="sum")
