"""MACE (the ``mace-torch`` package, optional extra ``pip install pyg_equireann[mace]``) with the
SchNet-style signature ``forward(z, pos, batch) -> (B,)``, so that it is trained by the same
:class:`~pyg_equireann.training.module.PotentialModule`, on the same targets (E0, scale and shift from
:class:`~pyg_equireann.models.referenced.ReferencedModel`) and benchmarked in the same harness as every model.

mace-torch 0.3.x imports e3nn 0.4.4, which ``torch.load``-s a pickled constants file at import and
fails under torch >= 2.6 (``weights_only`` by default); mace's ``__init__`` works around it by setting
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process. :func:`import_mace` sets it only for the
import and restores the environment afterwards, so later ``torch.load`` calls keep torch's safe default.
"""
import importlib
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pyg_equireann.graph.edges import image_shifts
from pyg_equireann.graph.edges import ensure_graph
from pyg_equireann.nn.elements import check_atomic_numbers, element_mask, element_slots

_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def import_mace():
    """Import ``mace.modules`` (and e3nn's ``o3``) under torch >= 2.6; returns ``(modules, o3)``."""
    previous = os.environ.get(_ENV)
    os.environ[_ENV] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
            modules = importlib.import_module("mace.modules")
            o3 = importlib.import_module("e3nn.o3")
    except ImportError as err:
        raise ImportError("MACE needs the optional extra: pip install 'pyg_equireann[mace]' "
                          f"(mace-torch); import failed with: {err}") from err
    finally:
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous
    return modules, o3


class MACEPotential(nn.Module):
    """MACE (Batatia et al., NeurIPS 2022) from ``mace-torch``, as ``mace_run_train --model MACE``
    builds it (residual interaction blocks, first block non-residual, Bessel radial basis with a
    polynomial envelope, SiLU gates), on :func:`pyg_equireann.radius_graph` (no compiled extensions).

    Args:
        elements: atomic numbers the model knows (one-hot node attributes).
        cutoff: r_max in Å.
        hidden_irreps: e.g. ``"64x0e + 64x1o"`` (MACE's ``--num_channels 64 --max_L 1``).
        max_ell: highest l of the edge spherical harmonics; correlation: body order − 1 per layer.
        avg_num_neighbors: normalisation of the aggregated messages (from the training data).
        Other arguments as in ``mace.modules.ScaleShiftMACE``. Its own E0 is zero and its scale 1:
        reference energies, scale and shift come from the wrapper, as for every model here.

    ``forward(z (N,), pos (N, 3) Å, batch (N,)) -> (B,)`` interaction energies (eV, before scaling).
    """

    supports_pbc = True  # the capability of :class:`~pyg_equireann.models.base.Potential`, read by ReferencedModel

    def __init__(
        self,
        elements: Sequence[int],
        cutoff: float = 5.0,
        hidden_irreps: str = "64x0e + 64x1o",
        max_ell: int = 3,
        correlation: int = 3,
        num_interactions: int = 2,
        num_bessel: int = 8,
        num_polynomial_cutoff: int = 5,
        radial_mlp: Sequence[int] = (64, 64, 64),
        mlp_irreps: str = "16x0e",
        avg_num_neighbors: float = 1.0,
    ):
        super().__init__()
        modules, o3 = import_mace()
        self.cutoff = float(cutoff)
        self.elements = [int(z) for z in elements]
        self.register_buffer("element_index", element_slots(self.elements), persistent=False)
        self.register_buffer("element_mask", element_mask(self.elements), persistent=False)
        with warnings.catch_warnings():  # e3nn's TorchScript compilation warns about its own annotations
            warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
            self.mace = modules.ScaleShiftMACE(
                r_max=self.cutoff,
                num_bessel=num_bessel,
                num_polynomial_cutoff=num_polynomial_cutoff,
                max_ell=max_ell,
                interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
                num_interactions=num_interactions,
                num_elements=len(self.elements),
                hidden_irreps=o3.Irreps(hidden_irreps),
                MLP_irreps=o3.Irreps(mlp_irreps),
                atomic_energies=torch.zeros(len(self.elements)).numpy(),
                avg_num_neighbors=float(avg_num_neighbors),
                atomic_numbers=self.elements,
                correlation=correlation,
                gate=torch.nn.functional.silu,
                radial_MLP=list(radial_mlp),
                atomic_inter_scale=1.0,
                atomic_inter_shift=0.0,
            )

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
                cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None) -> Tensor:
        """Energies (B,); ``cell`` (B, 3, 3) Å and ``pbc`` (B, 3) for periodic structures."""
        if batch is None:
            batch = torch.zeros_like(z)
        check_atomic_numbers(z, self.element_mask)
        species = self.element_index[z]
        num_graphs = int(batch.max()) + 1 if batch.numel() else 1
        edge_index, offsets = ensure_graph(pos, self.cutoff, batch, cell, pbc)
        if offsets is None:
            shifts = pos.new_zeros(edge_index.size(1), 3)
            cell = pos.new_zeros(num_graphs, 3, 3)
        else:  # MACE's vector is x_receiver − x_sender + shift = −r_ij: negated offsets and shifts
            cell = cell.view(-1, 3, 3).to(pos.dtype)
            shifts = -image_shifts(edge_index, offsets, cell, batch)
            offsets = -offsets
        counts = torch.bincount(batch, minlength=num_graphs)
        ptr = torch.zeros(num_graphs + 1, dtype=torch.long, device=z.device)
        ptr[1:] = torch.cumsum(counts, 0)
        data = {
            "positions": pos,
            "node_attrs": nn.functional.one_hot(species, len(self.elements)).to(pos.dtype),
            # MACE: edge_index[0] is the sender, vectors = pos[receiver] - pos[sender] + shift
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": shifts if offsets is None else offsets,
            "cell": cell,
            "batch": batch,
            "ptr": ptr,
        }
        out = self.mace(data, training=self.training, compute_force=False)
        return out["interaction_energy"]

    def extra_repr(self) -> str:
        return f"elements={self.elements}, cutoff={self.cutoff}"
