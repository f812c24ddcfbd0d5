"""Input checks shared by the models and the data modules: clear errors instead of silent NaN."""
import math
from typing import Optional

import torch
from torch import Tensor

#: Two atoms (or an atom and a periodic image) closer than this (Å) are rejected: the direction of
#: their separation, hence the angular basis and the forces, is undefined at zero distance (NaN) and
#: grows like 1/d near it. No physical structure has atoms this close.
MIN_DISTANCE = 0.01


def _atom_name(i: int, batch: Optional[Tensor]) -> str:
    """``atom i`` or, in a batch of several structures, ``atom k of structure g (atom i of the batch)``."""
    if batch is None or batch.numel() == 0 or int(batch[-1]) == 0:
        return f"atom {i}"
    g = int(batch[i])
    first = int((batch == g).nonzero()[0, 0])
    return f"atom {i - first} of structure {g} (atom {i} of the batch)"


def check_geometry(
    pos: Tensor,
    edge_index: Tensor,
    edge_lengths: Tensor,
    batch: Optional[Tensor] = None,
    edge_shift: Optional[Tensor] = None,
    min_distance: float = MIN_DISTANCE,
) -> None:
    """Raise a ValueError naming the atom(s) if ``pos`` (N, 3) has NaN/inf or an edge of
    ``edge_index`` (2, E) [neighbour j, centre i] is shorter than ``min_distance`` (Å) or not finite
    (``edge_lengths`` (E,); ``edge_shift`` (E, 3) tells periodic images apart). One host sync when
    everything is fine."""
    ok = torch.isfinite(pos).all()
    if edge_lengths.numel():
        ok = ok & (edge_lengths >= min_distance).all()  # False for NaN lengths too
    if bool(ok):
        return
    finite = torch.isfinite(pos).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{_atom_name(i, batch)} has a non-finite position (NaN or inf): {pos[i].detach().tolist()}")
    e = int((~(edge_lengths >= min_distance)).nonzero()[0, 0])
    j, i = int(edge_index[0, e]), int(edge_index[1, e])
    d = float(edge_lengths[e].detach())
    if not math.isfinite(d):
        raise ValueError(
            f"the distance between {_atom_name(i, batch)} and {_atom_name(j, batch)} is {d}: the cell or the periodic "
            "image shifts contain NaN or inf"
        )
    image = edge_shift is not None and bool(edge_shift[e].abs().sum() > 0)
    several = batch is not None and batch.numel() > 0 and int(batch[-1]) > 0
    first = int((batch == batch[i]).nonzero()[0, 0]) if several else 0
    other = f"atom {j - first}"
    if image:
        other = "a periodic image of " + ("itself" if i == j else other)
    pair = f"atom {i - first} and {other}"
    suffix = f" of structure {int(batch[i])} (atoms {i} and {j} of the batch)" if several else ""
    raise ValueError(
        f"{pair}{suffix} are {d:.3g} Å apart (closer than {min_distance} Å): "
        "overlapping atoms have no defined forces. Remove duplicated atoms or check the positions and cell"
    )
