"""Input checks shared by the models, the exported models and the data modules: clear errors instead
of silent NaN or an exploding neighbour list.

The message builders (:func:`geometry_message`, :func:`cell_density_message`) compile with
``torch.jit.script``, so an exported model (:mod:`pyg_equireann.deploy.torchscript`) raises the same text as the
Python model.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

#: Two atoms (or an atom and a periodic image) closer than this (Å) are rejected: the direction of
#: their separation, hence the angular basis and the forces, is undefined at zero distance (NaN) and
#: grows like 1/d near it. No physical structure has atoms this close.
MIN_DISTANCE = 0.01

#: Periodic structures denser than this (atoms/Å³) are rejected before their neighbour list is built.
#: The densest solid at ambient pressure, diamond, has 0.176 atoms/Å³, hydrogen compressed to 500 GPa
#: about 0.8; denser input is a wrong cell (a cell in Bohr or nm, a fractional cell, a cell shrunk by a
#: diverging NPT run) whose neighbour list would not fit in memory: one atom in a 0.05 Å cube has 2e6
#: neighbours within 4 Å. Equivalently, the estimated neighbours per atom, N/V · (4/3)πr_c³, may not
#: exceed MAX_ATOM_DENSITY · (4/3)πr_c³ (524 for a 5 Å cutoff); for cells periodic in one or two
#: directions the periodic images of one atom within r_c (2r_c/|a| or πr_c²/|a×b|) are counted.
MAX_ATOM_DENSITY = 1.0


def format_float(x: float) -> str:
    """``f"{x:.3g}"``, written so that TorchScript compiles it (its ``%`` formatting has no ``%g``)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0.0:
        return "0"
    sign = "-" if x < 0 else ""
    a = abs(x)
    e = int(math.floor(math.log10(a)))
    digits = int(round(a / 10.0 ** (e - 2)))
    if digits >= 1000:  # 9.996 -> 10.0
        digits = digits // 10
        e += 1
    if digits < 100:  # log10 rounded up at a power of ten
        digits = digits * 10
        e -= 1
    text = str(digits)
    if -4 <= e < 3:
        if e >= 0:
            whole, frac = text[: e + 1], text[e + 1:]
        else:
            whole, frac = "0", text
            for _ in range(-e - 1):
                frac = "0" + frac
        frac = frac.rstrip("0")
        return sign + whole + ("." + frac if len(frac) > 0 else "")
    mantissa = text[0] + "." + text[1:]
    mantissa = mantissa.rstrip("0").rstrip(".")
    exponent = str(abs(e))
    if len(exponent) < 2:
        exponent = "0" + exponent
    return sign + mantissa + "e" + ("-" if e < 0 else "+") + exponent


def _format_row(row: Tensor) -> str:
    values: List[float] = row.detach().double().cpu().tolist()
    return "[" + ", ".join([format_float(v) for v in values]) + "]"


def _atom_name(i: int, batch: Optional[Tensor]) -> str:
    """``atom i`` or, in a batch of several structures, ``atom k of structure g (atom i of the batch)``."""
    if batch is None or batch.numel() == 0 or int(batch[-1]) == 0:
        return "atom " + str(i)
    g = int(batch[i])
    first = int((batch == g).nonzero()[0, 0])
    return "atom " + str(i - first) + " of structure " + str(g) + " (atom " + str(i) + " of the batch)"


def nonfinite_message(pos: Tensor, batch: Optional[Tensor] = None) -> str:
    """The error text for the first atom of ``pos`` (N, 3) with a NaN or inf coordinate (call when there is
    one); ``batch`` (N,) or None names the structure."""
    i = int((~torch.isfinite(pos).all(dim=1)).nonzero()[0, 0])
    return _atom_name(i, batch) + " has a non-finite position (NaN or inf): " + _format_row(pos[i])


def check_finite_positions(pos: Tensor, batch: Optional[Tensor] = None) -> None:
    """Raise a ValueError with :func:`nonfinite_message` if ``pos`` (N, 3) has a NaN or inf coordinate
    (one host sync); ``batch`` (N,) or None names the structure."""
    if not bool(torch.isfinite(pos).all()):
        raise ValueError(nonfinite_message(pos, batch))


def geometry_message(
    pos: Tensor,
    edge_index: Tensor,
    edge_lengths: Tensor,
    batch: Optional[Tensor] = None,
    edge_shift: Optional[Tensor] = None,
    min_distance: float = MIN_DISTANCE,
) -> str:
    """The error text of :func:`check_inputs` for geometry (called once the cheap test has failed): the first atom
    with a non-finite position, else the first edge shorter than ``min_distance`` or not finite."""
    if not bool(torch.isfinite(pos).all()):
        return nonfinite_message(pos, batch)
    bad = (~(edge_lengths >= min_distance)).nonzero()
    if bad.shape[0] == 0:
        return "the geometry check failed without a bad atom or pair"
    e = int(bad[0, 0])
    j, i = int(edge_index[0, e]), int(edge_index[1, e])
    d = float(edge_lengths[e].detach())
    if math.isnan(d) or math.isinf(d):
        return ("the distance between " + _atom_name(i, batch) + " and " + _atom_name(j, batch) + " is "
                + format_float(d) + ": the cell or the periodic image shifts contain NaN or inf")
    image = False
    if edge_shift is not None:
        image = bool(edge_shift[e].abs().sum() > 0)
    several = False
    first = 0
    if batch is not None:
        if batch.numel() > 0 and int(batch[-1]) > 0:
            several = True
            first = int((batch == batch[i]).nonzero()[0, 0])
    other = "atom " + str(j - first)
    if image:
        other = "a periodic image of " + ("itself" if i == j else other)
    pair = "atom " + str(i - first) + " and " + other
    suffix = ""
    if several and batch is not None:
        suffix = " of structure " + str(int(batch[i])) + " (atoms " + str(i) + " and " + str(j) + " of the batch)"
    return (pair + suffix + " are " + format_float(d) + " Å apart (closer than " + format_float(min_distance)
            + " Å): overlapping atoms have no defined forces. Remove duplicated atoms or check the positions and cell")


def _cell_density(num_atoms: Tensor, cell: Tensor, pbc: Tensor, cutoff: float,
                  max_density: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(bad (B,) bool, estimated neighbours per atom (B,), covolume of the periodic directions (B,),
    number of periodic directions (B,), cell (B, 3, 3) float64) without a host sync."""
    cell = cell.detach().to(torch.float64).reshape(-1, 3, 3)
    pbc = pbc.to(device=cell.device, dtype=torch.bool).reshape(-1, 3)
    periodic = pbc.sum(dim=1)
    # covolume of the periodic directions: sqrt(det) of their Gram matrix (identity elsewhere)
    both = pbc.unsqueeze(2) & pbc.unsqueeze(1)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand(cell.shape[0], 3, 3)
    gram = torch.where(both, cell @ cell.transpose(1, 2), eye)
    covolume = torch.linalg.det(gram).clamp(min=0.0).sqrt()
    rc = float(cutoff)
    ball = torch.tensor([0.0, 2.0 * rc, math.pi * rc * rc, 4.0 / 3.0 * math.pi * rc ** 3],
                        dtype=cell.dtype, device=cell.device)
    images = ball.index_select(0, periodic) / covolume  # periodic images of one atom within the cutoff
    neighbors = torch.where(periodic == 3, num_atoms.to(cell.device, cell.dtype) * images, images)
    limit = max_density * 4.0 / 3.0 * math.pi * rc ** 3
    bad = (periodic > 0) & ~(neighbors <= limit)  # NaN and inf too
    return bad, neighbors, covolume, periodic, cell


def cell_density_message(
    num_atoms: Tensor,
    cell: Tensor,
    pbc: Tensor,
    cutoff: float,
    max_density: float = MAX_ATOM_DENSITY,
) -> str:
    """``""`` if every periodic structure is sparse enough for a neighbour list within ``cutoff`` (Å),
    else the error text for the first one that is not (see :data:`MAX_ATOM_DENSITY`): a non-finite cell,
    a cell of zero volume, or more estimated neighbours per atom than ``max_density`` · (4/3)πr_c³.
    ``num_atoms`` (B,) atoms per structure, ``cell`` (B, 3, 3) rows = lattice vectors (Å), ``pbc`` (B, 3)
    bool. One host sync."""
    bad, neighbors, covolume, periodic, cell = _cell_density(num_atoms, cell, pbc, cutoff, max_density)
    rc = float(cutoff)
    if not bool(bad.any()):
        return ""
    g = int(bad.nonzero()[0, 0])
    where = "" if cell.shape[0] == 1 else "structure " + str(g) + ": "
    if not bool(torch.isfinite(cell[g]).all()):
        return where + "the cell contains non-finite values (NaN or inf): " + _format_row(cell[g].flatten())
    k = int(periodic[g])
    n = int(num_atoms[g])
    covol = float(covolume[g])
    if not covol > 0.0:
        return (where + "the periodic lattice vectors of the cell are linearly dependent (zero volume): "
                + _format_row(cell[g].flatten()) + ". Check the cell")
    dense = "more than the " + format_float(max_density) + " atoms/Å³ of matter far denser than any solid"
    tail = (" Å cutoff would hold about " + format_float(float(neighbors[g]))
            + " neighbours per atom. Check the cell and its units (Å)")
    if k == 3:
        return (where + "a periodic cell of " + format_float(covol) + " Å³ holds " + str(n)
                + (" atom: " if n == 1 else " atoms: ") + format_float(n / covol) + " atoms/Å³, " + dense
                + "; its neighbour list within the " + format_float(rc) + tail)
    return (where + "the periodic " + ("length" if k == 1 else "area") + " of the cell is " + format_float(covol)
            + (" Å" if k == 1 else " Å²") + ": the periodic images of one atom alone are " + dense
            + "; its neighbour list within the " + format_float(rc) + tail)


def check_cell_density(num_atoms: Tensor, cell: Tensor, pbc: Tensor, cutoff: float,
                       max_density: float = MAX_ATOM_DENSITY) -> None:
    """ValueError with :func:`cell_density_message` unless it is empty; call before building a
    periodic neighbour list."""
    message = cell_density_message(num_atoms, cell, pbc, cutoff, max_density)
    if message:
        raise ValueError(message)


def check_structure(pos: Tensor, cutoff: float, batch: Optional[Tensor] = None, cell: Optional[Tensor] = None,
                    pbc: Optional[Tensor] = None, max_density: float = MAX_ATOM_DENSITY) -> None:
    """The checks to run before building a neighbour list within ``cutoff`` (Å): finite positions
    (:func:`check_inputs`'s text) and, for periodic structures, :func:`check_cell_density`.
    ``pos`` (N, 3), ``batch`` (N,) sorted or None, ``cell`` (3, 3) or (B, 3, 3), ``pbc`` (3,) or (B, 3)
    (default all periodic when a cell is given). One host sync when everything is fine."""
    finite = torch.isfinite(pos).all()
    bad = torch.zeros(0, dtype=torch.bool, device=pos.device)
    if cell is not None:
        cells = cell.reshape(-1, 3, 3)
        periodic = torch.ones(3, dtype=torch.bool) if pbc is None else torch.as_tensor(pbc).to(torch.bool)
        periodic = periodic.reshape(-1, 3).expand(cells.shape[0], 3).to(cells.device)
        if batch is None or cells.shape[0] == 1:
            num_atoms = torch.tensor([pos.shape[0]], device=cells.device)
        else:
            num_atoms = torch.bincount(batch, minlength=cells.shape[0]).to(cells.device)
        bad = _cell_density(num_atoms, cells, periodic, cutoff, max_density)[0].to(pos.device)
    if bool(finite & ~bad.any()):
        return
    if not bool(finite):
        raise ValueError(nonfinite_message(pos, batch))
    check_cell_density(num_atoms, cells, periodic, cutoff, max_density)


def input_problems(z: Tensor, pos: Tensor, allowed: Optional[Tensor] = None, edge_index: Optional[Tensor] = None,
                   edge_shift: Optional[Tensor] = None, min_distance: float = MIN_DISTANCE) -> Tensor:
    """() bool on the device, without a host sync: does ``z`` (N,) hold an atomic number outside 1..118 or
    ``allowed`` (a (MAX_Z+1,) bool mask), ``pos`` (N, 3) a NaN/inf, or ``edge_index`` (2, E) [j, i] an edge
    shorter than ``min_distance`` (Å) or not finite (``edge_shift`` (E, 3) Å of periodic edges)?"""
    from pyg_equireann.graph.edges import edge_vectors  # edges.py imports this module
    from pyg_equireann.nn.elements import invalid_atomic_numbers

    bad = invalid_atomic_numbers(z.long(), allowed) | ~torch.isfinite(pos).all()
    if edge_index is not None and edge_index.shape[1] > 0:
        lengths = torch.linalg.vector_norm(edge_vectors(pos.detach(), edge_index, edge_shift), dim=-1)
        bad = bad | ~(lengths >= min_distance).all()  # NaN lengths too
    return bad


def raise_input_error(z: Tensor, pos: Tensor, allowed: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                      edge_index: Optional[Tensor] = None, edge_shift: Optional[Tensor] = None,
                      min_distance: float = MIN_DISTANCE) -> None:
    """Raise the ValueError for what :func:`input_problems` found (call when it is True): the first atom
    with an unknown element (:func:`~pyg_equireann.nn.elements.check_atomic_numbers`), else
    :func:`geometry_message`."""
    from pyg_equireann.graph.edges import edge_vectors
    from pyg_equireann.nn.elements import check_atomic_numbers

    check_atomic_numbers(z.long(), allowed)
    if edge_index is None:
        edge_index = torch.zeros(2, 0, dtype=torch.long, device=pos.device)
    lengths = torch.linalg.vector_norm(edge_vectors(pos.detach(), edge_index, edge_shift), dim=-1)
    raise ValueError(geometry_message(pos, edge_index, lengths, batch, edge_shift, min_distance))


def check_inputs(z: Tensor, pos: Tensor, allowed: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                 edge_index: Optional[Tensor] = None, edge_shift: Optional[Tensor] = None,
                 min_distance: float = MIN_DISTANCE) -> None:
    """The input check of every entry point (one host sync): :func:`input_problems`, then
    :func:`raise_input_error` if it found something. ``batch`` (N,) names the structure in messages."""
    if bool(input_problems(z, pos, allowed, edge_index, edge_shift, min_distance)):
        raise_input_error(z, pos, allowed, batch, edge_index, edge_shift, min_distance)
