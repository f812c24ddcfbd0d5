import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from pyg_equireann import EquiREANN
from pyg_equireann.utils import perturb_parameters

DATA = Path(__file__).resolve().parents[1] / "data"

# One intra-op thread, here and in the commands the tests start. The tests' tensors are tiny, so a
# second thread gains nothing on an idle machine, and on a loaded one every op's thread barrier waits
# for a descheduled worker: with torch's default of one thread per core the cumulene twist training
# took 260 s instead of 20 s and the NVE run 139 s instead of 8 s (2 cores, load average 9.5).
torch.set_num_threads(1)
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``build(folder)`` fills once per test session, shared by the pytest-xdist
    workers (their common temporary folder): the first worker to ask builds it, one that asks meanwhile waits
    for it, the others find it. For expensive files that tests only read (exports, training runs): with
    ``--dist worksteal`` a module's tests can be split between the workers, and each one would build its own
    module-scoped copy."""
    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder above popen-gw0, popen-gw1, ...
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a failed build: start again
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Random non-zero weights everywhere, including the zero-initialised output layers."""
    return perturb_parameters(model, seed, scale)


def make_model(cls=EquiREANN, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(**kwargs).double()
    randomize(model, seed)
    return model


def load_rmd17(molecule: str = "aspirin", frames=slice(0, 4), split: str = "train"):
    """(z (n,), coords (F, n, 3) Å, energies (F,) eV, forces (F, n, 3) eV/Å) from the shipped files."""
    from ase.units import kcal, mol

    d = np.load(DATA / "rmd17" / f"rmd17_{molecule}_{split}_01.npz")
    z = torch.as_tensor(d["nuclear_charges"], dtype=torch.long)
    conv = kcal / mol
    return (
        z,
        torch.as_tensor(d["coords"][frames], dtype=torch.float64),
        torch.as_tensor(d["energies"][frames] * conv, dtype=torch.float64),
        torch.as_tensor(d["forces"][frames] * conv, dtype=torch.float64),
    )


def random_rotation(seed: int, reflect: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = -q
    return q


def small_periodic_system(seed: int = 0):
    """A skewed 4-atom cell (two elements) smaller than twice a 4 Å cutoff."""
    gen = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[3.1, 0.0, 0.0], [0.9, 2.9, 0.0], [0.4, 0.7, 3.3]], dtype=torch.float64)
    frac = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    pos = frac @ cell
    z = torch.tensor([8, 1, 1, 6])
    return z, pos, cell


#: modules with the longest tests (a torch.compile, an AOTInductor package, a wheel build and install: 30-65 s
#: each on an idle machine) run first, so no worker starts one of them when the other has nothing left to do;
#: within a module the order is kept (module-scoped fixtures are built once)
LONG_FIRST = ("test_engine.py", "test_deploy.py", "test_wheel.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable
