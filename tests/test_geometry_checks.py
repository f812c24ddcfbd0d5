"""The geometry checks of the Python model also guard the ASE calculator (on the module and on an exported
``.pt2`` package), the exported-model wrapper ``DeployedPotential`` (loaded package and eager module) and
``energy_forces_stress``: overlapping atoms, a 1e-6 Å pair, a NaN position, a tiny periodic cell and an
unknown element raise the model's own error text instead of NaN energies, huge forces or an out-of-memory
crash."""
import numpy as np
import pytest
import torch
from ase import Atoms

from pyg_equireann import energy_forces_stress
from pyg_equireann.deploy.ase import EquiREANNCalculator
from pyg_equireann.deploy.package import DeployedPotential
from pyg_equireann.graph.checks import format_float

from .conftest import load_rmd17, small_periodic_system
from .test_ase_calculator import deploy_model, shared_package

WATER = [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]


def structures():
    """name -> (atoms, how the Python model is asked for the reference error)."""
    overlap = Atoms("OHH", positions=[WATER[0], WATER[1], WATER[1]])
    close = Atoms("OHH", positions=[WATER[0], WATER[1], [0.96 + 1e-6, 0.0, 0.0]])
    nan = Atoms("OHH", positions=[WATER[0], WATER[1], [float("nan"), 0.93, 0.0]])
    tiny = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 0.05, pbc=True)  # was out of memory
    sheet = Atoms("C", positions=[[0.0, 0.0, 0.0]], cell=np.diag([0.05, 0.05, 10.0]), pbc=[True, True, False])
    unknown = Atoms("OHN", positions=WATER)
    return {"overlap": overlap, "1e-6 pair": close, "nan position": nan, "tiny cell": tiny, "tiny 2d cell": sheet,
            "unknown element": unknown}


@pytest.fixture(scope="module")
def model():
    return deploy_model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The model as an exported ``.pt2`` package (shared with the calculator tests) and its loaded wrapper."""
    path = shared_package(tmp_path_factory)
    return path, DeployedPotential.from_file(path)


@pytest.fixture(scope="module")
def calculators(model, exported):
    """ASE calculators of the module and of the exported file."""
    return EquiREANNCalculator(model), EquiREANNCalculator(exported[0])


def inputs(atoms):
    cell = torch.tensor(atoms.cell[:]) if atoms.pbc.any() else None
    pbc = torch.tensor(atoms.pbc) if atoms.pbc.any() else None
    return torch.tensor(atoms.numbers), torch.tensor(atoms.positions), cell, pbc


def model_message(model, atoms) -> str:
    """The Python model's error text, from ``energy_forces_stress`` on a precomputed neighbour list (as in
    training; for NaN positions built from finite ones, as the neighbour search refuses NaN itself)."""
    z, pos, cell, pbc = inputs(atoms)
    with pytest.raises(ValueError) as err:
        if cell is not None:
            energy_forces_stress(model, z, pos, cell=cell, pbc=pbc)  # the density check comes first
        else:
            edge_index, _ = model.build_graph(torch.nan_to_num(pos, nan=5.0))
            energy_forces_stress(model, z, pos, edge_index=edge_index)
    return str(err.value)


@pytest.mark.parametrize("name", list(structures()))
def test_bad_geometry_raises_the_model_error_everywhere(model, exported, calculators, name):
    atoms = structures()[name]
    expected = model_message(model, atoms)
    assert "\n" not in expected
    z, pos, cell, pbc = inputs(atoms)
    _, loaded = exported
    # ASE calculator, from the module (eager) and from the exported package
    for calc in calculators:
        atoms.calc = calc
        with pytest.raises(ValueError) as err:
            atoms.get_forces()
        assert str(err.value) == expected
    # energy_forces_stress, and the exported-model wrapper on the loaded package and on the module
    with pytest.raises(ValueError) as err:
        energy_forces_stress(model, z, pos, cell=cell, pbc=pbc)
    assert str(err.value) == expected
    for deployed in (loaded, DeployedPotential.from_module(model)):
        with pytest.raises(ValueError) as err:
            deployed.predict(z, pos, cell, pbc)
        assert str(err.value) == expected


def test_pairs_from_a_given_neighbour_list(model, exported):
    """The wrapper checks a caller's neighbour list (as MD drivers pass it), including an atom and its own
    periodic image 0.005 Å away, in a batch (the message names the structure), with the model's text."""
    _, loaded = exported
    z, pos = torch.tensor([1, 1, 8, 1]), torch.tensor([WATER[0], WATER[1], WATER[0], WATER[1]])
    edge_index = torch.tensor([[0, 1, 2, 2], [1, 0, 2, 2]])
    offsets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    cell = torch.stack([torch.eye(3) * 5.0, torch.eye(3) * 0.005])
    batch = torch.tensor([0, 0, 1, 1])
    expected = ("atom 0 and a periodic image of itself of structure 1 (atoms 2 and 2 of the batch) are 0.005 Å "
                "apart (closer than 0.01 Å): overlapping atoms have no defined forces. Remove duplicated atoms or "
                "check the positions and cell")
    with pytest.raises(ValueError) as err:
        energy_forces_stress(model, z, pos, batch, cell=cell, edge_index=edge_index, cell_offsets=offsets)
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        loaded(z, pos, edge_index, offsets, cell, batch)
    assert str(err.value) == expected
    out = loaded(z, pos, edge_index[:, :2], offsets[:2], cell, batch)  # without the bad pair: runs
    assert out["energy"].shape == (2,) and torch.isfinite(out["forces"]).all()


def test_normal_structures_unchanged(model, exported, calculators):
    """Physical structures pass: a molecule and a dense periodic cell (diamond, 0.176 atoms/Å³) give the
    model's numbers through every path."""
    _, loaded = exported
    z, coords, _, _ = load_rmd17("aspirin", slice(0, 1))
    aspirin = Atoms(numbers=z.numpy(), positions=coords[0].numpy())
    zc, posc, cellc = small_periodic_system()
    from ase.build import bulk

    diamond = bulk("C", "diamond", a=3.567, cubic=True)
    for atoms in (aspirin, Atoms(numbers=zc.numpy(), positions=posc.numpy(), cell=cellc.numpy(), pbc=True), diamond):
        z, pos, cell, pbc = inputs(atoms)
        ref = energy_forces_stress(model, z, pos, cell=cell, pbc=pbc)
        got = loaded.predict(z, pos, cell, pbc)
        assert float(got["energy"][0]) == pytest.approx(float(ref["energy"][0].detach()), rel=1e-12)
        torch.testing.assert_close(got["forces"], ref["forces"].detach(), rtol=0, atol=1e-10)
        for calc in calculators:
            atoms.calc = calc
            assert atoms.get_potential_energy() == pytest.approx(float(got["energy"][0]), rel=1e-12)
            np.testing.assert_allclose(atoms.get_forces(), got["forces"].numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("x", [0.0, 1e-6, 0.005, 0.01, 0.0123456, 1.0, 9.996, 42.0, 999.5, 4.19e6, -3.3e-5,
                               float("nan"), float("inf"), 123456.0, 1e-4])
def test_format_float_is_g3(x):
    assert format_float(x) == f"{x:.3g}"
