"""Export of an EquiREANN-family model as a ``.pt2`` package that needs only torch.

The exported function is :class:`ForceField`: the model's own forward plus one ``torch.autograd.grad``
to positions and strain, traced with ``make_fx`` (autograd unrolled into aten ops, as NequIP does for its
AOTInductor models) and exported with ``torch.export`` with dynamic numbers of atoms, edges and graphs.
The package is ``torch.export.save``'s archive (load with ``torch.export.load``) or, with ``aoti=True``,
an AOTInductor package (``torch._inductor.aoti_load_package``); both carry ``metadata.json``.
The neighbour list is an input: the caller builds it. Interface: ``docs/deployment.md``.
"""
import copy
import json
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from pyg_equireann.graph.checks import MIN_DISTANCE
from pyg_equireann.graph.edges import image_shifts
from pyg_equireann.graph.forces import strained_inputs
from pyg_equireann.models.base import Potential
from pyg_equireann.utils import dtype_name, resolve_dtype

#: Written into ``metadata.json``. 3: a torch.export/AOTInductor ``.pt2`` of :class:`ForceField`
#: (1 and 2 were TorchScript files, see :mod:`pyg_equireann.deploy.package`).
INTERFACE_VERSION = 3

UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "virial": "eV", "stress": "eV/Å³"}
INPUTS = ["z", "pos", "edge_index", "cell_offsets", "cell", "batch"]
OUTPUTS = ["energy", "atomic_energies", "forces", "virial"]


class ForceField(nn.Module):
    r"""Energy, forces and virial of an EquiREANN-family model from a given neighbour list: the function
    that is exported (and that the ASE calculator runs eagerly for a module or checkpoint).

    ``forward(z, pos, edge_index, cell_offsets, cell, batch) -> (energy, atomic_energies, forces, virial)``:

    * ``z`` (N,) int64 atomic numbers; ``pos`` (N, 3) Å; ``edge_index`` (2, E) int64 [neighbour j,
      centre i]; ``cell_offsets`` (E, 3) integer-valued image offsets (model dtype), so that
      :math:`r_{ij} = x_j - x_i + n_{ij} \cdot \mathrm{cell}_{b(i)}`; ``cell`` (B, 3, 3) Å (rows =
      lattice vectors; zeros for molecules); ``batch`` (N,) int64 sorted graph index.
    * ``energy`` (B,) float64 eV; ``atomic_energies`` (N,) float64 eV; ``forces`` (N, 3)
      :math:`-\partial E/\partial x` eV/Å; ``virial``
      (B, 3, 3) :math:`W = -\partial E/\partial\varepsilon` eV under the symmetric strain
      :math:`x \to x(1+\varepsilon)` of positions and cell (stress = :math:`-W/V`).

    No input checks (no host synchronisation): :class:`~pyg_equireann.deploy.package.DeployedPotential`
    validates before it calls this.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not (isinstance(model, Potential) and model.deployable):
            raise ValueError(
                f"only EquiREANN-family models can be deployed, got {type(model).__name__}; "
                "wrap other models in an ASE calculator from their checkpoint instead")
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def forward(self, z: Tensor, pos: Tensor, edge_index: Tensor, cell_offsets: Tensor, cell: Tensor,
                batch: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        num_graphs = cell.shape[0]
        with torch.enable_grad():
            pos = pos.detach().requires_grad_(True)
            inputs, strained_pos, cells = strained_inputs(pos, batch, cell, num_graphs, True)
            edge_shift = image_shifts(edge_index, cell_offsets.to(pos.dtype), cells, batch)
            out = self.model.compute(z, strained_pos, batch, edge_index=edge_index, edge_shift=edge_shift,
                                     num_graphs=num_graphs)
            grad_pos, grad_strain = torch.autograd.grad(out["energy"].sum(), inputs)
        return out["energy"].detach(), out["atomic_energies"].detach(), -grad_pos, -grad_strain


def example_inputs(model: nn.Module, dtype: torch.dtype, device: Union[str, torch.device] = "cpu"
                   ) -> Tuple[Tensor, ...]:
    """Inputs to trace :class:`ForceField` with: :func:`check_structures` as one batch (2 graphs, 28 atoms;
    sizes above 1, so that no dimension is specialised)."""
    from pyg_equireann.graph.edges import ensure_graph

    elements = model.known_elements() or [1, 6, 7, 8]
    zs, positions, offsets, cells, batches, edges = [], [], [], [], [], []
    first = 0
    for g, (z, pos, cell) in enumerate(check_structures(elements)):
        pos = pos.to(dtype)
        edge_index, cell_offsets = ensure_graph(pos, float(model.cutoff), None, cell, None)
        if cell_offsets is None:
            cell_offsets = torch.zeros(edge_index.shape[1], 3, dtype=dtype)
            cell = torch.zeros(3, 3, dtype=dtype)
        zs.append(z)
        positions.append(pos)
        edges.append(edge_index + first)
        offsets.append(cell_offsets.to(dtype))
        cells.append(cell.to(dtype))
        batches.append(torch.full((len(z),), g, dtype=torch.long))
        first += len(z)
    inputs = (torch.cat(zs), torch.cat(positions), torch.cat(edges, 1), torch.cat(offsets), torch.stack(cells),
              torch.cat(batches))
    return tuple(t.to(device) for t in inputs)


def export_program(model: nn.Module, dtype: Union[str, torch.dtype, None] = None,
                   device: Union[str, torch.device] = "cpu") -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ForceField` (model in ``dtype``, default its own, on ``device``) with
    dynamic atoms, edges and graphs: one program for any system size."""
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    dtype = next(model.parameters()).dtype if dtype is None else resolve_dtype(dtype)
    forcefield = ForceField(model).to(device=device, dtype=dtype)  # a copy: the caller's model is unchanged
    args = example_inputs(forcefield.model, dtype, device)
    # make_fx unrolls the autograd.grad into aten ops (torch.export alone cannot trace the backward of
    # every op here, e.g. sqrt); duck shaping off, so that N, E and B never fold into a static size
    previous = fx_config.use_duck_shape
    fx_config.use_duck_shape = False
    try:
        graph = make_fx(forcefield, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                        _error_on_data_dependent_ops=True)(*[a.clone() for a in args])
    finally:
        fx_config.use_duck_shape = previous
    atoms = torch.export.Dim("num_atoms", min=1)
    edges = torch.export.Dim("num_edges", min=1)
    graphs = torch.export.Dim("num_graphs", min=1)
    shapes = ({0: atoms}, {0: atoms}, {1: edges}, {0: edges}, {0: graphs}, {0: atoms})
    return torch.export.export(graph, args, dynamic_shapes=shapes, strict=False)


def model_metadata(model: nn.Module, dtype: torch.dtype, **extra) -> dict:
    """The ``metadata.json`` of an exported model: interface, elements, cutoff, units, dtype, model class."""
    from pyg_equireann import __version__

    elements = model.known_elements()
    return {
        "interface_version": INTERFACE_VERSION,
        "model": type(model).__name__,
        "elements": None if elements is None else list(elements),
        "cutoff": float(model.cutoff),
        "min_distance": float(getattr(model, "min_distance", MIN_DISTANCE)),
        "units": UNITS,
        "dtype": dtype_name(dtype),
        "inputs": INPUTS,
        "outputs": OUTPUTS,
        "pyg_equireann_version": __version__,
        "torch_version": torch.__version__,
        **extra,
    }


def save_package(program: torch.export.ExportedProgram, path: Union[str, Path], metadata: dict,
                 aoti: bool = False, inductor_configs: Optional[dict] = None) -> Path:
    """Write ``program`` to ``path`` (``.pt2``) with ``metadata.json``: ``torch.export.save`` or, with
    ``aoti``, an AOTInductor package compiled for this machine's device and CPU instruction set
    (``inductor_configs``: extra options of ``torch._inductor.aoti_compile_and_package``)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(metadata, format="aoti" if aoti else "export"), indent=2)
    if aoti:
        configs = dict(inductor_configs or {}, **{"aot_inductor.metadata": {"metadata.json": text}})
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    else:
        torch.export.save(program, str(path), extra_files={"metadata.json": text})
    return path


def export_model(model: nn.Module, out: Union[str, Path], dtype: Union[str, torch.dtype, None] = None,
                 aoti: bool = False, device: Union[str, torch.device] = "cpu",
                 inductor_configs: Optional[dict] = None, **metadata) -> Path:
    """Export ``model`` (an EquiREANN-family module, copied) to the ``.pt2`` package ``out`` for ``device``
    (an AOTInductor package with ``aoti``); extra keyword arguments go into ``metadata.json``."""
    dtype = next(model.parameters()).dtype if dtype is None else resolve_dtype(dtype)
    program = export_program(model, dtype, device)
    metadata = model_metadata(model, dtype, device=str(torch.device(device)), **metadata)
    return save_package(program, out, metadata, aoti, inductor_configs)


def check_structures(elements, seed: int = 0) -> List[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Two test structures ``(z, pos, cell)`` of the model's elements: a 12-atom cluster and a periodic 16-atom
    cell (atoms on a jittered grid, 1.3 Å apart, so no pair is unphysically close); float64 positions in Å."""
    gen = torch.Generator().manual_seed(seed)
    elements = torch.tensor(list(elements)[:8], dtype=torch.long)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).view(-1, 3)
    structures = []
    for n, cell in ((12, None), (16, torch.tensor([[4.1, 0.0, 0.0], [0.3, 3.9, 0.0], [0.2, -0.4, 4.3]]))):
        pos = (grid[:n] * 1.3 + 0.15 * torch.randn(n, 3, generator=gen)).double()
        z = elements[torch.randint(len(elements), (n,), generator=gen)]
        structures.append((z, pos, None if cell is None else cell.double()))
    return structures


def compare(model: nn.Module, deployed, elements) -> Dict[str, float]:
    """Largest relative deviation of energy, forces and stress of ``deployed``
    (:class:`~pyg_equireann.deploy.package.DeployedPotential`) from ``model`` on :func:`check_structures`."""
    from pyg_equireann.graph.forces import energy_forces_stress

    out = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for z, pos, cell in check_structures(elements):
        pos = pos.to(deployed.dtype)
        ref = energy_forces_stress(model, z, pos, cell=cell, compute_stress=cell is not None)
        got = {k: v.cpu() for k, v in deployed.predict(z, pos, cell, compute_stress=cell is not None).items()}
        out["energy"] = max(out["energy"], float(((got["energy"] - ref["energy"].detach()).abs()
                                                  / ref["energy"].detach().abs()).max()))
        scale = float(ref["forces"].abs().max()) or 1.0
        out["forces"] = max(out["forces"], float((got["forces"] - ref["forces"]).abs().max()) / scale)
        if cell is not None:
            scale = float(ref["stress"].abs().max()) or 1.0
            out["stress"] = max(out["stress"], float((got["stress"] - ref["stress"]).abs().max()) / scale)
    return out


def export(ckpt_path: str, out: str, dtype: str = "float64", check: bool = True, aoti: bool = False,
           device: str = "cpu") -> Dict[str, float]:
    """Export the checkpoint's model (EMA weights) to the ``.pt2`` package ``out`` for ``device`` (the one an
    AOTInductor package will run on); returns the deviations of :func:`compare` (if ``check``), which fail
    above 1e-6 (float64) or 1e-3 (float32) relative."""
    from pyg_equireann.deploy.package import DeployedPotential
    from pyg_equireann.training.evaluation import load_checkpoint

    torch_dtype = resolve_dtype(str(dtype))
    if Path(ckpt_path).expanduser().is_file() and _has_metadata(ckpt_path):
        raise ValueError(f"{ckpt_path} is a model written by equireann-export, not a training checkpoint; export "
                         "the run's checkpoints/best.ckpt")
    module = load_checkpoint(ckpt_path, float64=None)
    model = module.model.to(torch_dtype).eval()
    if not getattr(model, "deployable", False):
        raise ValueError(f"{ckpt_path}: only EquiREANN-family models can be exported, got {type(model).__name__}")
    path = export_model(model, out, torch_dtype, aoti, device, model_config=module.hparams.get("model_config"),
                        checkpoint=str(Path(ckpt_path).expanduser().resolve()))
    deviations = {}
    if check:
        deployed = DeployedPotential.from_file(path, device)
        deviations = compare(model, deployed, deployed.elements or [1, 6, 7, 8])
        tolerance = 1e-6 if torch_dtype == torch.float64 else 1e-3
        worst = max(deviations.values())
        if worst > tolerance:
            raise ValueError(f"exported model deviates from the checkpoint by {worst:.2e} (relative) > {tolerance}: "
                             f"{deviations}")
    return deviations


def _has_metadata(path: Union[str, Path]) -> bool:
    try:
        read_metadata(path)
    except ValueError:
        return False
    return True


def read_metadata(path: Union[str, Path]) -> dict:
    """The ``metadata.json`` of an exported ``.pt2`` package, read from the archive without loading the
    program. Plain torch: ``torch.export.load(path, extra_files={"metadata.json": ""})`` or
    ``torch._inductor.aoti_load_package(path).get_metadata()["metadata.json"]``."""
    path = Path(path).expanduser()
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                if name.endswith("/extra/metadata.json"):
                    return json.loads(archive.read(name))
            for name in names:
                if name.endswith("wrapper_metadata.json"):
                    text = json.loads(archive.read(name)).get("metadata.json")
                    if text is not None:
                        return json.loads(text)
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a .pt2 package written by equireann-export ({error})") from None
    raise ValueError(f"{path} is not a .pt2 package written by equireann-export (no metadata.json)")
