"""Deployable EquiREANN: a TorchScript module that needs only ``torch`` to run.

:class:`DeployedPotential` re-expresses a trained :class:`~pyg_equireann.EquiREANN` (or REANN) with
plain ``index_add_`` aggregation instead of PyG's ``MessagePassing`` and with the species
embeddings tabulated for the model's elements, so that ``torch.jit.script`` accepts it. It reuses
the model's own cutoff, angular basis, contractions and MLPs, so both compute the same function.
Energies depend on positions only through the edge vectors :math:`r_{ij} = x_j - x_i + S_{ij}`;
one backward pass to the edge vectors gives forces and the virial (interface: ``docs/deployment.md``).
"""
import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from pyg_equireann.graph.checks import MAX_ATOM_DENSITY, MIN_DISTANCE, cell_density_message, geometry_message
from pyg_equireann.graph.edges import edge_vectors, image_shifts
from pyg_equireann.models.base import Potential
from pyg_equireann.nn.elements import MAX_Z, element_slots

#: Interface version written into exported files (``metadata.json``). 2: the one-structure method is
#: :meth:`DeployedPotential.predict` (``compute`` in version 1 files).
INTERFACE_VERSION = 2


class _ScriptableElementMLPs(nn.Module):
    """Scriptable form of :class:`~pyg_equireann.nn.readout.ElementMLPs` (same networks, same output)."""

    def __init__(self, mlps: nn.Module):
        super().__init__()
        self.out_features = int(mlps.out_features)
        self.nets = mlps.nets

    def forward(self, x: Tensor, element_index: Tensor) -> Tensor:
        out = x.new_zeros(x.shape[0], self.out_features)
        for e, net in enumerate(self.nets):
            rows = (element_index == e).nonzero().squeeze(-1)
            if rows.numel() > 0:
                out = out.index_copy(0, rows, net(x.index_select(0, rows)))
        return out


class _SharedScriptableMLP(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: Tensor, element_index: Tensor) -> Tensor:
        return self.mlp(x)


def _scriptable_mlp(module: nn.Module) -> nn.Module:
    from pyg_equireann.nn.readout import ElementMLPs

    if isinstance(module, ElementMLPs):
        return _ScriptableElementMLPs(module)
    return _SharedScriptableMLP(module.mlp)  # equireann._SharedMLP


class _AngularBasis(nn.Module):
    """Scriptable angular basis: real spherical harmonics of the unit vector or Cartesian powers of the
    raw vector, identical to :class:`~pyg_equireann.nn.orbitals.AngularBasis`."""

    def __init__(self, max_l: int, kind: str):
        super().__init__()
        self.max_l = int(max_l)
        self.spherical = kind == "spherical"

    def forward(self, vectors: Tensor, lengths: Tensor) -> Tensor:
        if not self.spherical:
            blocks = [torch.ones_like(vectors[:, :1])]
            for _ in range(self.max_l):
                blocks.append((blocks[-1].unsqueeze(-1) * vectors.unsqueeze(1)).flatten(1))
            return torch.cat(blocks, dim=-1)
        unit = vectors / lengths.unsqueeze(-1)
        x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
        rows: List[List[Tensor]] = [[torch.full_like(x, 0.5 / math.sqrt(math.pi))]]
        if self.max_l >= 1:
            c1 = math.sqrt(3.0 / (4.0 * math.pi))
            rows.append([-c1 * y, c1 * z, -c1 * x])
        r2 = x * x + y * y + z * z
        for l in range(2, self.max_l + 1):
            prev, prev2 = rows[l - 1], rows[l - 2]
            row: List[Tensor] = [x] * (2 * l + 1)
            s = -math.sqrt((2.0 * l + 1.0) / (2.0 * l))
            row[2 * l] = s * (x * prev[2 * l - 2] - y * prev[0])
            row[0] = s * (x * prev[0] + y * prev[2 * l - 2])
            t = math.sqrt(2.0 * l + 1.0)
            row[2 * l - 1] = t * z * prev[2 * l - 2]
            row[1] = t * z * prev[0]
            for m in range(-(l - 2), l - 1):
                a = math.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
                b = -math.sqrt(((l - 1.0) ** 2 - m * m) / (4.0 * (l - 1.0) ** 2 - 1.0))
                row[l + m] = a * (z * prev[l - 1 + m] + b * r2 * prev2[l - 2 + m])
            rows.append(row)
        flat: List[Tensor] = []
        for row in rows:
            flat.extend(row)
        return torch.stack(flat, dim=-1)


class _Iteration(nn.Module):
    """One :class:`~pyg_equireann.nn.conv.EquiREANNConv` iteration with ``index_add_`` aggregation."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.contraction = conv.contraction
        self.message_mlp = None if conv.message_mlp is None else _scriptable_mlp(conv.message_mlp)
        self.passing = bool(conv.equivariant_passing)
        weight = getattr(conv, "passing_weight", None)
        # learned passing weights λ_{l(a),k} expanded to (A, K); None: the paper's fixed 1
        self.register_buffer("passing_weight",
                             None if weight is None else weight.detach().index_select(0, conv.degrees).clone())

    def forward(self, edge_index: Tensor, edge_orbitals: Tensor, edge_cutoff: Tensor, coefficients: Tensor,
                center_weight: Optional[Tensor], node_orbitals: Optional[Tensor], density: Optional[Tensor],
                element_index: Tensor, inv_n: float, num_atoms: int) -> Tuple[Tensor, Tensor, Tensor]:
        neighbor, center = edge_index[0], edge_index[1]
        if self.message_mlp is not None and density is not None:
            coefficients = coefficients + self.message_mlp(density, element_index).index_select(0, neighbor)
        message = coefficients.unsqueeze(1) * edge_orbitals
        if self.passing and node_orbitals is not None:
            passed = node_orbitals
            weight = self.passing_weight
            if weight is not None:
                passed = passed * weight
            message = message + edge_cutoff.view(-1, 1, 1) * passed.index_select(0, neighbor)
        shape = [num_atoms, edge_orbitals.shape[1], edge_orbitals.shape[2]]
        aggregated = torch.zeros(shape, dtype=message.dtype, device=message.device).index_add_(0, center, message)
        if inv_n != 1.0:
            aggregated = aggregated * inv_n
        return aggregated, self.contraction(aggregated, center_weight), coefficients


class DeployedPotential(nn.Module):
    r"""TorchScript-ready EquiREANN/REANN potential: energy, forces and virial from a neighbour list.

    ``forward(pos, atomic_numbers, edge_index, edge_shift=None, batch=None, compute_virial=False)``:

    * ``pos`` (N, 3) Å; ``atomic_numbers`` (N,) int; ``edge_index`` (2, E) int64 with row 0 the
      neighbour j and row 1 the centre i; ``edge_shift`` (E, 3) Cartesian image shifts (Å) so that
      :math:`r_{ij} = x_j - x_i + S_{ij}` (None: no shifts); ``batch`` (N,) sorted graph index.
    * Every pair within the cutoff must be present in both directions; pairs at or beyond the cutoff
      may be included (they contribute exactly zero and are dropped first), so a list built with a
      skin can be reused.
    * Returns ``energy`` (B,) float64 eV, ``atomic_energies`` (N,) float64, ``forces`` (N, 3) eV/Å,
      ``edge_gradient`` (E, 3) :math:`\partial E/\partial r_{ij}` and with ``compute_virial``
      ``virial`` (B, 3, 3) eV, :math:`W = -\sum_{ij} r_{ij} \otimes \partial E/\partial r_{ij}`
      (symmetrised; stress = -W / V).

    Must be called with autograd enabled (not under ``torch.no_grad()``). :meth:`neighbor_list` and
    :meth:`predict` build the neighbour list in pure torch for single structures.

    Bad input raises ``ValueError`` with the Python model's text (:mod:`pyg_equireann.graph.checks`):
    NaN/inf positions, atoms or images closer than ``min_distance`` (0.01 Å), and in
    :meth:`neighbor_list` cells denser than ``max_atom_density`` (1 atom/Å³). Scripted, torch reports
    it as ``torch.jit.Error`` whose last line is ``builtins.ValueError: <text>``; :func:`script_error`
    (used by the ASE calculator) turns that back into the ValueError.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not (isinstance(model, Potential) and model.deployable):
            raise ValueError(
                f"only EquiREANN-family models can be deployed, got {type(model).__name__}; "
                "wrap other models in an ASE calculator from their checkpoint instead")
        model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        self.cutoff = float(model.cutoff)
        self.min_distance = float(getattr(model, "min_distance", MIN_DISTANCE))
        self.max_atom_density = MAX_ATOM_DENSITY
        self.elements: List[int] = list(model.elements) if model.elements is not None else list(range(1, MAX_Z + 1))
        self.num_radial = int(model.num_radial)
        self.num_elements = len(self.elements)
        self.inv_avg_num_neighbors = 1.0 / float(model.avg_num_neighbors)

        species = torch.tensor(self.elements, dtype=torch.long, device=device)
        s = species.numel()
        self.register_buffer("element_slot", element_slots(self.elements).to(device))
        with torch.no_grad():
            # species tables: evaluated once per element (pair), as the model does per system
            every = torch.arange(s, device=device)
            c0, alpha, mu = model.species_embedding(species, every, torch.cartesian_prod(every, every).flip(1).t(), dtype)
            self.register_buffer("pair_table", torch.cat([c0, alpha, mu], dim=-1).contiguous())  # (S*S, 3K)
            if model.center_weight is not None:
                weight = model.center_weight(species, every, dtype)
            else:
                weight = torch.ones(s, int(model.num_channels), dtype=dtype, device=device)
        self.use_center_weight = model.center_weight is not None
        self.register_buffer("center_weight_table", weight.contiguous())
        self.register_buffer("atomic_energies", model.atomic_energies.detach().clone().double())
        self.register_buffer("energy_scale", model.energy_scale.detach().clone())
        self.register_buffer("energy_shift", model.energy_shift.detach().clone())
        self.register_buffer("density_scale", model.density_scale.detach().clone())  # ρ⁽ᵗ⁾ / density_scale[t]
        self.cutoff_fn = model.cutoff_fn
        self.angular = _AngularBasis(model.angular.max_l, model.angular.kind)
        self.iterations = nn.ModuleList([_Iteration(conv) for conv in model.convs])
        self.readout = _scriptable_mlp(model.readout)

    def _apply(self, fn, recurse=True):
        atomic_energies = self.atomic_energies  # keep float64 through .float()
        super()._apply(fn, recurse)
        self.atomic_energies = atomic_energies.to(self.atomic_energies.device, torch.float64)
        return self

    def _slots(self, atomic_numbers: Tensor) -> Tensor:
        # TorchScript form of nn.elements.check_atomic_numbers (which formats with ASE's symbols)
        z = atomic_numbers.long()
        max_z = self.element_slot.shape[0] - 1
        bad = (z < 1) | (z > max_z)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError("atom " + str(i) + " has atomic number " + str(int(z[i])) + ", expected 1.." + str(max_z))
        slot = self.element_slot.index_select(0, z)
        if bool((slot < 0).any()):
            i = int((slot < 0).nonzero()[0, 0])
            raise ValueError("atom " + str(i) + " has atomic number " + str(int(z[i]))
                             + ", which this model was not trained on; model elements: " + str(self.elements))
        return slot

    def forward(self, pos: Tensor, atomic_numbers: Tensor, edge_index: Tensor, edge_shift: Optional[Tensor] = None,
                batch: Optional[Tensor] = None, compute_virial: bool = False) -> Dict[str, Tensor]:
        if not torch.is_grad_enabled():
            raise RuntimeError("forces need autograd: do not call the potential under torch.no_grad()")
        if pos.dim() != 2 or pos.shape[1] != 3:
            raise ValueError("pos must have shape (N, 3), got " + str(list(pos.shape)))
        num_atoms = pos.shape[0]
        if atomic_numbers.shape[0] != num_atoms:
            raise ValueError("atomic_numbers has " + str(atomic_numbers.shape[0]) + " entries but pos has "
                             + str(num_atoms) + " atoms")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError("edge_index must have shape (2, E), got " + str(list(edge_index.shape)))
        dtype = self.center_weight_table.dtype
        pos = pos.to(dtype)
        z = atomic_numbers.long()
        slot = self._slots(z)
        edge_index = edge_index.long()
        if batch is None:
            batch = torch.zeros(num_atoms, dtype=torch.long, device=pos.device)
        num_graphs = int(batch.max()) + 1 if num_atoms > 0 else 1
        num_edges = edge_index.shape[1]
        if edge_shift is not None:
            if edge_shift.shape[0] != num_edges:
                raise ValueError("edge_shift has " + str(edge_shift.shape[0]) + " rows but there are "
                                 + str(num_edges) + " edges")
            edge_shift = edge_shift.to(dtype)
        vectors = edge_vectors(pos.detach(), edge_index, edge_shift)
        # the model's geometry check (finite positions, no pair closer than min_distance) and the test for
        # pairs at or beyond the cutoff, which contribute exactly zero (lists built with a skin): one sync
        squared = vectors.square().sum(-1)
        within = squared < self.cutoff * self.cutoff
        ok = torch.isfinite(pos).all() & (squared >= self.min_distance * self.min_distance).all()
        flags: List[bool] = torch.stack([ok, within.all()]).tolist()
        if not flags[0]:
            raise ValueError(geometry_message(pos.detach(), edge_index, squared.sqrt(), batch, edge_shift,
                                              self.min_distance))
        kept: Optional[Tensor] = None
        if not flags[1]:
            kept = within.nonzero().squeeze(1)
            edge_index = edge_index.index_select(1, kept)
            vectors = vectors.index_select(0, kept)
        neighbor, center = edge_index[0], edge_index[1]
        vectors.requires_grad_(True)
        lengths = torch.linalg.vector_norm(vectors, dim=-1)

        s = self.num_elements
        table = self.pair_table.index_select(0, slot.index_select(0, center) * s + slot.index_select(0, neighbor))
        k = self.num_radial
        coefficients, alpha, mu = table[:, :k], table[:, k:2 * k], table[:, 2 * k:]
        edge_cutoff = self.cutoff_fn(lengths)
        radial = torch.exp(-(alpha * (lengths.unsqueeze(-1) - mu)).square())
        angular = self.angular(vectors, lengths) * edge_cutoff.unsqueeze(-1)
        edge_orbitals = angular.unsqueeze(-1) * radial.unsqueeze(1)
        center_weight: Optional[Tensor] = None
        if self.use_center_weight:
            center_weight = self.center_weight_table.index_select(0, slot)

        node_orbitals: Optional[Tensor] = None
        density: Optional[Tensor] = None
        t = 0
        for iteration in self.iterations:
            node_orbitals, density, coefficients = iteration(
                edge_index, edge_orbitals, edge_cutoff, coefficients, center_weight, node_orbitals, density,
                slot, self.inv_avg_num_neighbors, num_atoms)
            density = density / self.density_scale[t]
            t += 1
        assert density is not None
        raw = self.readout(density, slot).squeeze(-1)
        atomic = self.atomic_energies.index_select(0, z) + (self.energy_scale * raw + self.energy_shift).double()
        energy = torch.zeros(num_graphs, dtype=torch.float64, device=pos.device).index_add_(0, batch, atomic)

        grad = torch.autograd.grad([energy.sum()], [vectors], allow_unused=True)[0]
        if grad is None:
            grad = torch.zeros_like(vectors)
        forces = torch.zeros_like(pos).index_add_(0, center, grad).index_add_(0, neighbor, -grad)
        edge_gradient = grad
        if kept is not None:
            edge_gradient = torch.zeros(num_edges, 3, dtype=dtype, device=pos.device).index_copy_(0, kept, grad)
        out = {"energy": energy.detach(), "atomic_energies": atomic.detach(), "forces": forces,
               "edge_gradient": edge_gradient}
        if compute_virial:
            per_edge = -(vectors.detach().unsqueeze(2) * grad.unsqueeze(1)).flatten(1)  # (E, 9)
            virial = torch.zeros(num_graphs, 9, dtype=dtype, device=pos.device)
            virial = virial.index_add_(0, batch.index_select(0, center), per_edge).view(num_graphs, 3, 3)
            out["virial"] = 0.5 * (virial + virial.transpose(1, 2))
        return out

    @torch.jit.export
    def neighbor_list(self, pos: Tensor, cell: Optional[Tensor] = None,
                      pbc: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """All pairs within the cutoff of one structure in pure torch (O(N² · images), for small and
        medium systems): ``edge_index`` (2, E) [j, i] and Cartesian ``edge_shift`` (E, 3)."""
        dtype = self.center_weight_table.dtype
        pos = pos.detach().to(dtype)
        n = pos.shape[0]
        device = pos.device
        periodic = torch.zeros(3, dtype=torch.bool, device=device)
        box = torch.zeros(3, 3, dtype=dtype, device=device)
        if cell is not None:
            box = cell.detach().to(dtype).view(3, 3)
            if pbc is None:
                periodic = torch.ones(3, dtype=torch.bool, device=device)
            else:
                periodic = pbc.to(device=device, dtype=torch.bool).view(3)
        if cell is not None:  # before the list can explode (one atom in a 0.05 Å cell: 4e6 neighbours)
            message = cell_density_message(torch.tensor([n], device=device), box.unsqueeze(0),
                                           periodic.unsqueeze(0), self.cutoff, self.max_atom_density)
            if message != "":
                raise ValueError(message)
        wrapped = pos
        wrap = torch.zeros(n, 3, dtype=dtype, device=device)
        counts = [0, 0, 0]
        if bool(periodic.any()):
            inverse = torch.linalg.inv(box)
            wrap = torch.where(periodic, torch.floor(pos @ inverse), torch.zeros_like(pos))
            wrapped = pos - wrap @ box
            heights = 1.0 / torch.linalg.vector_norm(inverse, dim=0)
            for d in range(3):
                if bool(periodic[d]):
                    counts[d] = int(math.ceil(self.cutoff / float(heights[d])))
        ranges = [torch.arange(-c, c + 1, dtype=dtype, device=device) for c in counts]
        offsets = torch.cartesian_prod(ranges[0], ranges[1], ranges[2]).view(-1, 3)
        rc2 = self.cutoff * self.cutoff
        chunk = max(1, (1 << 21) // max(n, 1))
        src: List[Tensor] = []
        dst: List[Tensor] = []
        off: List[Tensor] = []
        for o in range(offsets.shape[0]):
            offset = offsets[o]
            image = wrapped + offset @ box
            zero = bool((offset == 0).all())
            for start in range(0, n, chunk):
                centers = wrapped[start:start + chunk]
                d2 = (image.unsqueeze(0) - centers.unsqueeze(1)).square().sum(-1)  # (c, n)
                keep = d2 <= rc2
                if zero:
                    rows = torch.arange(centers.shape[0], device=device)
                    keep[rows, rows + start] = False
                ij = keep.nonzero()
                src.append(ij[:, 1])
                dst.append(ij[:, 0] + start)
                off.append(offset.expand(ij.shape[0], 3))
        j, i = torch.cat(src), torch.cat(dst)
        integer = torch.cat(off) - wrap.index_select(0, j) + wrap.index_select(0, i)
        edge_index = torch.stack([j, i])
        return edge_index, image_shifts(edge_index, integer, box)

    @torch.jit.export
    def predict(self, pos: Tensor, atomic_numbers: Tensor, cell: Optional[Tensor] = None,
                pbc: Optional[Tensor] = None, compute_virial: bool = False) -> Dict[str, Tensor]:
        """:meth:`forward` for one structure with the pure-torch :meth:`neighbor_list`."""
        edge_index, edge_shift = self.neighbor_list(pos, cell, pbc)
        return self.forward(pos, atomic_numbers, edge_index, edge_shift, None, compute_virial)


def script_error(error: Exception) -> Exception:
    """The ``ValueError`` that scripted code raised, from the ``torch.jit.Error`` that reports it (its
    text is the last line, ``builtins.ValueError: <text>``); other errors unchanged."""
    prefix = "builtins.ValueError: "
    if isinstance(error, torch.jit.Error):
        lines = [line for line in str(error).splitlines() if line.startswith(prefix)]
        if lines:
            return ValueError(lines[-1][len(prefix):])
    return error


def deploy(model: nn.Module, dtype: Optional[torch.dtype] = None, script: bool = True) -> nn.Module:
    """A :class:`DeployedPotential` of ``model`` in ``dtype`` (default: the model's), scripted with
    ``torch.jit.script`` unless ``script=False``."""
    deployed = DeployedPotential(model)
    if dtype is not None:
        deployed = deployed.to(dtype)
    return torch.jit.script(deployed) if script else deployed
