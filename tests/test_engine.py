"""The engine path: with a neighbour list given, EquiREANN's forward, energy+forces and a training step run
without host synchronisation (the checks run once where data enters), and the model compiles."""
import shutil

import pytest
import torch

from pyg_equireann import EquiREANN, REANN, energy_forces_stress
from pyg_equireann.datamodules import MD17DataModule
from pyg_equireann.training.module import PotentialModule
from pyg_equireann.utils import count_host_syncs

from .conftest import DATA, make_model


@pytest.fixture(scope="module")
def aspirin_batch(tmp_path_factory):
    """A batch of 5 rMD17 aspirin frames as training sees it: from the data module, with its cached graph."""
    root = tmp_path_factory.mktemp("rmd17")
    (root / "rmd17").mkdir()
    for split in ("train", "test"):
        shutil.copy(DATA / "rmd17" / f"rmd17_aspirin_{split}_01.npz", root / "rmd17")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dm = MD17DataModule("aspirin", root=root, num_train=10, num_val=2, num_test=2, batch_size=5, cutoff=4.0, dtype="float64",
                            download=False, progress=False)
        dm.setup()
        return next(iter(dm.train_dataloader()))
    finally:
        torch.set_default_dtype(previous)


def syncs(counts):
    return sum(counts.values())


@pytest.mark.parametrize("cls", [EquiREANN, REANN])
def test_training_step_and_energy_forces_without_host_syncs(aspirin_batch, cls):
    """≤ 2 host synchronisations (``aten::item`` / data-dependent shapes, counted by the profiler) in one
    training step (loss, double backward, the configured AdamW step) and in one energy+forces call."""
    batch = aspirin_batch
    model = make_model(cls, elements=[1, 6, 8], cutoff=4.0, avg_num_neighbors=10.0)
    module = PotentialModule(model)
    optimizer = module.configure_optimizers()["optimizer"]

    def step():
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # optimiser state created
    train = count_host_syncs(step)
    assert syncs(train) <= 2, train  # today: one, the check for a non-finite loss

    def energy_forces():
        energy_forces_stress(model, batch.z, batch.pos, batch.batch, edge_index=batch.edge_index,
                             num_graphs=batch.num_graphs)

    calls = count_host_syncs(energy_forces)
    assert syncs(calls) <= 2, calls  # one: the input check
    unchecked = count_host_syncs(lambda: model(batch.z, batch.pos, batch.batch, edge_index=batch.edge_index,
                                               num_graphs=batch.num_graphs))
    assert unchecked == {}


def test_checks_run_where_data_enters():
    """A bad input is refused by energy_forces_stress and by forward without a graph (entry points); forward
    with a graph is the unchecked engine path, and check_inputs gives the entry points' error."""
    model = make_model(EquiREANN, elements=[1, 8], cutoff=3.0)
    z, pos = torch.tensor([8, 1, 1]), torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [0.96, 0.0, 0.0]])
    edge_index, _ = model.build_graph(pos)
    with pytest.raises(ValueError, match="atom 1 and atom 2 are 0 Å apart"):
        energy_forces_stress(model, z, pos, edge_index=edge_index)
    with pytest.raises(ValueError, match="atom 1 and atom 2 are 0 Å apart"):
        model(z, pos)
    with pytest.raises(ValueError, match="atom 1 and atom 2 are 0 Å apart"):
        model.check_inputs(z, pos, edge_index=edge_index)
    with pytest.raises(ValueError, match="atom 1 is element C"):
        model.check_inputs(torch.tensor([8, 6, 1]), pos + torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert energy_forces_stress(model, z, pos, edge_index=edge_index, check=False)["forces"].isnan().any()


def test_compiled_forces_training_and_inference_match_eager(aspirin_batch):
    """``compile=True``: energies, forces and the parameter gradients of the energy+force loss from the compiled
    graph (force derivative inside it) equal eager ones to 1e-6 in float64, at two batch sizes from one
    compilation; inference with stress on a periodic cell too."""
    import copy

    from torch_geometric.data import Batch

    from .conftest import small_periodic_system

    # small, and with few operators (neighbour-element tables, no centre weight): compilation time grows with them
    model = make_model(EquiREANN, elements=[1, 6, 8], cutoff=4.0, num_iterations=1, max_l=1, num_radial=4,
                       num_channels=8, species_embedding="neighbor", center_weight=False, message_hidden=(16,),
                       readout_hidden=(16,), avg_num_neighbors=10.0)
    compiled = copy.deepcopy(model)
    compiled.compile_forces = True
    modules = PotentialModule(model), PotentialModule(compiled)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    smaller = Batch.from_data_list(aspirin_batch.to_data_list()[:3])
    for batch in (aspirin_batch, smaller):
        results = []
        for module in modules:
            out = module.predict_batch(batch, create_graph=True)
            loss, _ = module._loss_and_errors(batch, out)
            grads = torch.autograd.grad(loss, list(module.model.parameters()))
            results.append((out["energy"], out["forces"], grads))
        (e0, f0, g0), (e1, f1, g1) = results
        assert rel(e1, e0) < 1e-6 and rel(f1, f0) < 1e-6
        assert max(rel(a, b) for a, b in zip(g1, g0)) < 1e-6
    z, pos, cell = small_periodic_system()
    z = torch.tensor([8, 1, 1, 6])
    out0, out1 = (energy_forces_stress(m, z, pos, cell=cell, compute_stress=True) for m in (model, compiled))
    for key in ("energy", "forces", "stress"):
        assert rel(out1[key], out0[key]) < 1e-6, key


def test_hops_along_bonds_without_host_syncs_on_the_cuda_path(aspirin_batch):
    """The recipe's hops along bonds (``passing_hop_cutoff``): on a CPU the short hop list is one ``nonzero`` (one
    host sync per forward); the path CUDA takes (``compact_hop_edges=False``: every edge, weight 0 beyond r_hop)
    has none, in a forward and in a training step beyond the non-finite-loss check."""
    batch = aspirin_batch
    model = make_model(EquiREANN, elements=[1, 6, 8], cutoff=4.0, avg_num_neighbors=10.0, num_radial=16,
                       learnable_passing=True, passing_init="alternating", passing_hops=4, passing_norm=True,
                       passing_norm_eps=0.004, passing_nonbacktracking=True, passing_hop_channels=2,
                       passing_hop_cutoff=2.0)

    def forward():
        model(batch.z, batch.pos, batch.batch, edge_index=batch.edge_index, num_graphs=batch.num_graphs)

    assert syncs(count_host_syncs(forward)) == 1  # the CPU path: the hop list's nonzero
    model.compact_hop_edges = False
    assert count_host_syncs(forward) == {}
    module = PotentialModule(model)
    optimizer = module.configure_optimizers()["optimizer"]

    def step():
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    train = count_host_syncs(step)
    assert syncs(train) <= 1, train  # the check for a non-finite loss


def test_elastic_energy_without_host_syncs_on_the_cuda_path(aspirin_batch):
    """On a CPU the elastic orbital energy is one dense solve per graph (the largest graph's size is a host sync),
    or conjugate gradients stopped at a tolerance (one host sync per step); the path CUDA takes (every step, every
    edge with the bond weight) has none."""
    batch = aspirin_batch
    model = make_model(EquiREANN, elements=[1, 6, 8], cutoff=4.0, avg_num_neighbors=10.0, elastic_channels=2,
                       elastic_iterations=6)

    def forward():
        model(batch.z, batch.pos, batch.batch, edge_index=batch.edge_index, num_graphs=batch.num_graphs)

    assert syncs(count_host_syncs(forward)) >= 2  # the bond list's nonzero, the largest graph, the solver's checks
    model.elastic.dense_max_atoms = 0
    assert syncs(count_host_syncs(forward)) >= 3  # the bond list's nonzero and the tolerance checks
    model.compact_hop_edges = False
    model.elastic.tolerance = None
    assert count_host_syncs(forward) == {}
