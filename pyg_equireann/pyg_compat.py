"""Glue for running PyG's own models (SchNet, DimeNet++, ViSNet) without compiled extensions."""
from typing import Tuple

from torch import Tensor, nn

from .neighbors import radius_graph


class RadiusInteractionGraph(nn.Module):
    """Drop-in ``interaction_graph`` for :class:`torch_geometric.nn.models.SchNet` (and models with the
    same hook) built on :func:`pyg_equireann.radius_graph`, which needs neither pyg-lib nor
    torch-cluster. Unlike PyG's default it never truncates neighbours (``max_num_neighbors``), so the
    energy stays a smooth function of the positions.

    Example::

        from torch_geometric.nn.models import SchNet
        model = SchNet(cutoff=5.0, interaction_graph=RadiusInteractionGraph(5.0))
    """

    def __init__(self, cutoff: float, backend: str = "auto"):
        super().__init__()
        self.cutoff = float(cutoff)
        self.backend = backend

    def forward(self, pos: Tensor, batch: Tensor) -> Tuple[Tensor, Tensor]:
        """pos (N, 3), batch (N,) → edge_index (2, E), edge_weight (E,) distances in Å."""
        edge_index = radius_graph(pos, self.cutoff, batch, backend=self.backend)
        row, col = edge_index
        return edge_index, (pos[row] - pos[col]).norm(dim=-1)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, backend={self.backend!r}"
