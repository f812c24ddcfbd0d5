"""The geometry checks of the Python model also guard the ASE calculator, the deployable
``DeployedPotential`` (plain and TorchScript, also saved and reloaded with ``torch.jit.load``) and
``energy_forces_stress``: overlapping atoms, a 1e-6 Å pair, a NaN position and a tiny periodic cell
raise the model's own error text instead of NaN energies, huge forces or an out-of-memory crash."""
import numpy as np
import pytest
import torch
from ase import Atoms

from pyg_equireann import EquiREANN, energy_forces_stress
from pyg_equireann.deploy.ase import EquiREANNCalculator
from pyg_equireann.deploy.torchscript import DeployedPotential, deploy, script_error
from pyg_equireann.graph.checks import format_float

from .conftest import load_rmd17, make_model, small_periodic_system

WATER = [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]


def structures():
    """name -> (atoms, how the Python model is asked for the reference error)."""
    overlap = Atoms("OHH", positions=[WATER[0], WATER[1], WATER[1]])
    close = Atoms("OHH", positions=[WATER[0], WATER[1], [0.96 + 1e-6, 0.0, 0.0]])
    nan = Atoms("OHH", positions=[WATER[0], WATER[1], [float("nan"), 0.93, 0.0]])
    tiny = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 0.05, pbc=True)  # was out of memory
    sheet = Atoms("C", positions=[[0.0, 0.0, 0.0]], cell=np.diag([0.05, 0.05, 10.0]), pbc=[True, True, False])
    return {"overlap": overlap, "1e-6 pair": close, "nan position": nan, "tiny cell": tiny, "tiny 2d cell": sheet}


@pytest.fixture(scope="module")
def model():
    return make_model(EquiREANN, elements=[1, 6, 8], num_channels=8, cutoff=4.0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The model as an exported TorchScript file, reloaded with plain ``torch.jit.load``."""
    path = tmp_path_factory.mktemp("exported") / "model.pt"
    torch.jit.save(deploy(model), str(path))
    return path, torch.jit.load(str(path))


@pytest.fixture(scope="module")
def calculators(model, exported):
    """ASE calculators of the module and of the exported file."""
    return EquiREANNCalculator(model), EquiREANNCalculator(exported[0])


def inputs(atoms):
    cell = torch.tensor(atoms.cell[:]) if atoms.pbc.any() else None
    pbc = torch.tensor(atoms.pbc) if atoms.pbc.any() else None
    return torch.tensor(atoms.numbers), torch.tensor(atoms.positions), cell, pbc


def model_message(model, atoms) -> str:
    """The Python model's error text (for NaN positions: its check of a precomputed neighbour list,
    ``check_inputs``; its own neighbour search refuses NaN before that)."""
    z, pos, cell, pbc = inputs(atoms)
    with pytest.raises(ValueError) as err:
        if torch.isfinite(pos).all():
            model(z, pos, cell=cell, pbc=pbc)
        else:
            edge_index, _ = model.build_graph(torch.nan_to_num(pos, nan=5.0))
            model.check_inputs(z, pos, edge_index=edge_index)
    return str(err.value)


@pytest.mark.parametrize("name", list(structures()))
def test_bad_geometry_raises_the_model_error_everywhere(model, exported, calculators, name):
    atoms = structures()[name]
    expected = model_message(model, atoms)
    assert "\n" not in expected
    z, pos, cell, pbc = inputs(atoms)
    _, loaded = exported
    # ASE calculator (scripted DeployedPotential inside), from the module and from the exported file
    for calc in calculators:
        atoms.calc = calc
        with pytest.raises(ValueError) as err:
            atoms.get_forces()
        assert str(err.value) == expected
    # energy_forces_stress and the plain (unscripted) DeployedPotential: a Python ValueError
    with pytest.raises(ValueError) as err:
        energy_forces_stress(model, z, pos, cell=cell, pbc=pbc)
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        DeployedPotential(model).predict(pos, z, cell, pbc)
    assert str(err.value) == expected
    # TorchScript (deploy(), and the file reloaded with torch.jit.load): torch.jit.Error whose last line
    # is "builtins.ValueError: <the same text>"
    for scripted in (deploy(model), loaded):
        with pytest.raises(torch.jit.Error) as err:
            scripted.predict(pos, z, cell, pbc)
        assert str(err.value).splitlines()[-1] == "builtins.ValueError: " + expected
        assert isinstance(script_error(err.value), ValueError) and str(script_error(err.value)) == expected


def test_pairs_from_a_given_neighbour_list(model, exported):
    """forward() with the caller's neighbour list (as LAMMPS-style drivers call it) checks it too,
    including an atom and its own periodic image 0.005 Å away."""
    _, loaded = exported
    z, pos = torch.tensor([8, 1]), torch.tensor(WATER[:2])
    edge_index = torch.tensor([[0, 0], [0, 0]])
    shift = torch.tensor([[0.005, 0.0, 0.0], [-0.005, 0.0, 0.0]])
    with pytest.raises(torch.jit.Error, match=r"builtins.ValueError: atom 0 and a periodic image of itself are "
                                              r"0.005 Å apart \(closer than 0.01 Å\)"):
        loaded(pos, z, edge_index, shift)


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
        got = loaded.predict(pos, z, cell, pbc)
        assert float(got["energy"][0]) == pytest.approx(float(ref["energy"][0].detach()), rel=1e-12)
        torch.testing.assert_close(got["forces"], ref["forces"].detach(), rtol=0, atol=1e-10)
        atoms.calc = calculators[0]
        assert atoms.get_potential_energy() == pytest.approx(float(got["energy"][0]), rel=1e-12)
        np.testing.assert_allclose(atoms.get_forces(), got["forces"].numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("x", [0.0, 1e-6, 0.005, 0.01, 0.0123456, 1.0, 9.996, 42.0, 999.5, 4.19e6, -3.3e-5,
                               float("nan"), float("inf"), 123456.0, 1e-4])
def test_format_float_is_g3_in_python_and_torchscript(x):
    assert format_float(x) == f"{x:.3g}" == torch.jit.script(format_float)(x)
