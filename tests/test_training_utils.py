import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.nn.models import SchNet

from pyg_equireann import EquiREANN, compute_statistics, radius_graph
from pyg_equireann.models.pyg import RadiusInteractionGraph

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
