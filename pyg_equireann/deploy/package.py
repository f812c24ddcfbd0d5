"""The exported-model wrapper: a ``.pt2`` package (or a module, run eagerly through the same
:class:`~pyg_equireann.deploy.export.ForceField`) behind one call that validates its input like the Python
model and returns energies, forces, virial and stress."""
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from pyg_equireann.deploy.export import INTERFACE_VERSION, ForceField, model_metadata, read_metadata
from pyg_equireann.graph.checks import MIN_DISTANCE, input_problems, raise_input_error
from pyg_equireann.graph.edges import ensure_graph, image_shifts
from pyg_equireann.nn.elements import element_mask
from pyg_equireann.utils import dtype_name, resolve_dtype

Function = Callable[..., Tuple[Tensor, ...]]


def script_error(error: Exception) -> Exception:
    """The ``ValueError`` that TorchScript code raised, from the ``torch.jit.Error`` that reports it (its
    last line is ``builtins.ValueError: <text>``); other errors unchanged."""
    prefix = "builtins.ValueError: "
    lines = [line for line in str(error).splitlines() if line.startswith(prefix)]
    return ValueError(lines[-1][len(prefix):]) if lines else error


class _TorchScriptFile:
    """A TorchScript file of interface version 1 or 2 (written by earlier versions of equireann-export), called like
    :class:`ForceField`; the file holds its own code, nothing of it is kept in this package."""

    def __init__(self, path: Path, device: torch.device, dtype: Optional[torch.dtype]):
        scripted = torch.jit.load(str(path), map_location="cpu")
        if dtype is not None and dtype != scripted.center_weight_table.dtype:
            atomic_energies = scripted.atomic_energies.clone()  # totals stay float64
            scripted = scripted.to(dtype)
            scripted.atomic_energies = atomic_energies
        self.scripted = scripted.to(device).eval()
        self.dtype = self.scripted.center_weight_table.dtype

    def __call__(self, z, pos, edge_index, cell_offsets, cell, batch):
        shift = image_shifts(edge_index, cell_offsets, cell, batch)
        try:
            with torch.enable_grad():
                out = self.scripted(pos, z, edge_index, shift, batch, True)
        except torch.jit.Error as error:
            raise script_error(error) from None
        return out["energy"], out["atomic_energies"], out["forces"], out["virial"]


class DeployedPotential:
    r"""Energy, forces, virial and stress of an exported package or a module, from a given neighbour list,
    with the Python model's input checks.

    ``potential(z, pos, edge_index, cell_offsets=None, cell=None, batch=None, num_graphs=None)`` returns
    ``energy`` (B,) float64 eV, ``atomic_energies`` (N,) float64, ``forces`` (N, 3) eV/Å, ``virial``
    (B, 3, 3) eV (:math:`-\partial E/\partial\varepsilon`) and, with a ``cell``, ``stress`` (B, 3, 3)
    eV/Å³ (:math:`-W/V`, ASE sign). Inputs as for :class:`~pyg_equireann.deploy.export.ForceField`;
    ``cell`` (3, 3) or (B, 3, 3) and ``cell_offsets`` may be None for molecules.

    Before the call, with one host synchronisation: unknown elements, non-finite positions and listed pairs
    closer than ``min_distance`` raise the ValueError of :func:`~pyg_equireann.nn.elements.check_atomic_numbers`
    and :func:`~pyg_equireann.graph.checks.check_inputs`. :meth:`predict` builds the list
    (:func:`~pyg_equireann.graph.edges.ensure_graph`, which also rejects cells denser than
    :data:`~pyg_equireann.graph.checks.MAX_ATOM_DENSITY`).

    Build with :meth:`from_file` (``.pt2`` package, or a TorchScript file of interface 1/2) or
    :meth:`from_module` (eager :class:`~pyg_equireann.deploy.export.ForceField`).
    """

    def __init__(self, function: Function, metadata: dict, device: Union[str, torch.device] = "cpu"):
        self.function = function
        self.metadata = metadata
        self.device = torch.device(device)
        self.cutoff = float(metadata["cutoff"])
        self.elements = metadata["elements"]
        self.dtype = resolve_dtype(metadata["dtype"])
        self.min_distance = float(metadata.get("min_distance", MIN_DISTANCE))
        self.element_mask = element_mask(self.elements).to(self.device)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                  dtype: Union[str, torch.dtype, None] = None) -> "DeployedPotential":
        """Load an exported package (``torch.export`` or AOTInductor) for ``device``; ``dtype`` must be the
        file's (a TorchScript file of interface 1/2 is converted)."""
        path = Path(path).expanduser()
        metadata = read_metadata(path)
        device = torch.device(device)
        dtype = None if dtype is None else resolve_dtype(dtype)
        version = metadata.get("interface_version")
        if version in (1, 2):
            function = _TorchScriptFile(path, device, dtype)
            return cls(function, dict(metadata, dtype=dtype_name(function.dtype)), device)
        if version != INTERFACE_VERSION:
            raise ValueError(f"{path} has interface version {version}; this pyg_equireann reads versions 1-"
                             f"{INTERFACE_VERSION}: update pyg_equireann")
        if dtype is not None and dtype_name(dtype) != metadata["dtype"]:
            raise ValueError(f"{path} was exported in {metadata['dtype']}; export the checkpoint again with "
                             f"dtype={dtype_name(dtype)} (equireann-export ckpt_path=... dtype={dtype_name(dtype)})")
        exported_on = torch.device(metadata.get("device", "cpu"))
        if metadata.get("format") == "aoti":
            if exported_on.type != device.type:
                raise ValueError(f"{path} is an AOTInductor package compiled for {exported_on.type}, not "
                                 f"{device.type}; export it again with aoti on that device, or without aoti")
            function = torch._inductor.aoti_load_package(str(path), device_index=-1 if device.type == "cpu"
                                                         else (device.index or 0))
        else:
            program = torch.export.load(str(path))
            if exported_on != device:
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            function = program.module()
        return cls(function, metadata, device)

    @classmethod
    def from_module(cls, model: nn.Module, dtype: Union[str, torch.dtype, None] = torch.float64,
                    device: Union[str, torch.device] = "cpu") -> "DeployedPotential":
        """The eager :class:`ForceField` of an EquiREANN-family module (or of a
        :class:`~pyg_equireann.training.module.PotentialModule`'s model), copied, in ``dtype``."""
        model = getattr(model, "model", model)
        dtype = next(model.parameters()).dtype if dtype is None else resolve_dtype(dtype)
        forcefield = ForceField(model).to(device=device, dtype=dtype)  # ForceField copies the model
        return cls(forcefield, model_metadata(model, dtype, format="module", device=str(device)), device)

    def __call__(self, z: Tensor, pos: Tensor, edge_index: Tensor, cell_offsets: Optional[Tensor] = None,
                 cell: Optional[Tensor] = None, batch: Optional[Tensor] = None, num_graphs: Optional[int] = None,
                 check: bool = True) -> Dict[str, Tensor]:
        device, dtype = self.device, self.dtype
        z = z.to(device=device, dtype=torch.long)
        pos = pos.detach().to(device=device, dtype=dtype)
        edge_index = edge_index.to(device=device, dtype=torch.long)
        if pos.dim() != 2 or pos.shape[1] != 3:
            raise ValueError(f"pos must have shape (N, 3), got {tuple(pos.shape)}")
        if z.shape != pos.shape[:1]:
            raise ValueError(f"z has shape {tuple(z.shape)} but pos has {pos.shape[0]} atoms")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
        if cell is not None:
            cell = cell.to(device=device, dtype=dtype).reshape(-1, 3, 3)
            num_graphs = cell.shape[0]
            if cell_offsets is None:
                raise ValueError("a precomputed periodic edge_index needs its cell_offsets")
        if cell_offsets is None:
            cell_offsets = pos.new_zeros(edge_index.shape[1], 3)
        cell_offsets = cell_offsets.to(device=device, dtype=dtype)
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=device)
            num_graphs = 1 if num_graphs is None else num_graphs
        batch = batch.to(device=device, dtype=torch.long)
        # one host synchronisation for the checks and, if nothing gives it, the number of graphs
        if check or num_graphs is None:
            ok = self._valid(z, pos, edge_index, cell_offsets, cell, batch) if check else torch.ones((), device=device)
            graphs = batch[-1] + 1 if num_graphs is None and batch.numel() else torch.ones((), device=device)
            packed = int(graphs.long() * 2 + ok.long())
            if not packed % 2:
                self._raise(z, pos, edge_index, cell_offsets, cell, batch)
            num_graphs = packed // 2 if num_graphs is None else num_graphs
        periodic = cell is not None
        if cell is None:
            cell = pos.new_zeros(num_graphs, 3, 3)
        energy, atomic, forces, virial = self.function(z, pos, edge_index, cell_offsets, cell, batch)
        out = {"energy": energy, "atomic_energies": atomic, "forces": forces, "virial": virial}
        if periodic:
            out["stress"] = -virial / torch.linalg.det(cell).abs().view(-1, 1, 1)
        return out

    def _shifts(self, edge_index, cell_offsets, cell, batch) -> Optional[Tensor]:
        return None if cell is None else image_shifts(edge_index, cell_offsets, cell, batch)

    def _valid(self, z, pos, edge_index, cell_offsets, cell, batch) -> Tensor:
        """True (0-dim, on the device) if :meth:`_raise` would find nothing; no synchronisation."""
        shifts = self._shifts(edge_index, cell_offsets, cell, batch)
        return ~input_problems(z, pos, self.element_mask, edge_index, shifts, self.min_distance)

    def _raise(self, z, pos, edge_index, cell_offsets, cell, batch) -> None:
        """The Python model's error for this input (that of ``EquiREANN.check_inputs``)."""
        shifts = self._shifts(edge_index, cell_offsets, cell, batch)
        raise_input_error(z, pos, self.element_mask, batch, edge_index, shifts, self.min_distance)

    def predict(self, z: Tensor, pos: Tensor, cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None,
                compute_stress: bool = True) -> Dict[str, Tensor]:
        """:meth:`__call__` for one structure, with its neighbour list built by
        :func:`~pyg_equireann.graph.edges.ensure_graph` on the device (``stress`` needs a cell)."""
        pos = pos.detach().to(device=self.device, dtype=self.dtype)
        if cell is not None:
            cell = cell.to(device=self.device, dtype=self.dtype)
        edge_index, cell_offsets = ensure_graph(pos, self.cutoff, None, cell, pbc)
        out = self(z, pos, edge_index, cell_offsets, cell)
        if not compute_stress:
            out.pop("stress", None)
        return out


def load_potential(model: Union[str, os.PathLike, nn.Module, DeployedPotential],
                   device: Union[str, torch.device] = "cpu", dtype=None) -> DeployedPotential:
    """A :class:`DeployedPotential` from an exported package (``equireann-export``; also TorchScript files of
    interface 1/2), a training checkpoint (EMA weights, any suffix) or an EquiREANN-family module (copied).
    ``dtype``: default float64 for checkpoints and modules, the file's own for exported files."""
    if isinstance(model, DeployedPotential):
        return model
    dtype = None if dtype is None else resolve_dtype(dtype)
    if isinstance(model, nn.Module):
        return DeployedPotential.from_module(model, dtype or torch.float64, device)
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a path or an nn.Module, got {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix != ".ckpt":
        try:
            read_metadata(path)
        except ValueError:
            if path.suffix in (".pt", ".pt2"):
                raise ValueError(f"{path} is not a model written by equireann-export (no metadata.json)") from None
        else:
            return DeployedPotential.from_file(path, device, dtype)
    from pyg_equireann.training.module import PotentialModule

    module = PotentialModule.from_checkpoint(str(path))
    return DeployedPotential.from_module(module.model, dtype or torch.float64, device)
