"""Neighbour lists for EquiREANN graphs (no compiled extension needed).

Conventions (shared by every function here):

* ``pos``: ``(N, 3)`` Cartesian positions in Å, float32 or float64.
* ``batch``: ``(N,)`` long graph index of each atom, sorted (as in PyG) or ``None`` (one graph).
* ``edge_index``: ``(2, E)`` long, ``edge_index[0] = j`` (neighbour, source),
  ``edge_index[1] = i`` (centre, target); edges are sorted by centre ``i``, then ``j``
  (then cell offset), so results are deterministic.
* Periodic edges carry ``cell_offsets`` ``(E, 3)`` (integer values, dtype of ``pos``) with
  ``r_ij = pos[j] - pos[i] + cell_offsets @ cell[batch[i]]`` and ``|r_ij| <= cutoff``.

Backends of :func:`radius_graph` (non-periodic):

* ``"torch"``: all candidate pairs *within each graph* (``sum_g n_g**2``, vectorised, no
  Python loop over graphs), filtered by distance. Graphs too large for that (see
  :data:`TORCH_MAX_CANDIDATES`, :data:`TORCH_MAX_GRAPH_ATOMS`) go to vesin's O(N) cell list
  (vesin-torch on the device for CUDA tensors when installed, else vesin on the CPU).
* ``"torch_cluster"``: ``torch_cluster.radius_graph`` (optional compiled extension).
* ``"vesin"``: vesin cell list for the whole batch (one call, CPU, float64).
* ``"vesin_torch"``: the same call through vesin-torch (extra ``gpu``) on ``pos.device``.
* ``"auto"``: ``"torch"``; for CUDA tensors without vesin-torch, ``"torch_cluster"`` when it can
  be imported (on CPU the ``"torch"`` backend was measured fastest, see ``docs/neighbors.md``).

:func:`radius_graph_pbc` uses vesin-torch on ``pos.device`` for ``"vesin_torch"`` (and for
``"auto"`` with CUDA tensors when vesin-torch is installed), else vesin on the CPU. CUDA tensors
that take a CPU path because vesin-torch is missing trigger one warning per process. Every edge
any backend returns is re-checked with the same formula in ``pos.dtype``
(``|r_ij|**2 <= cutoff**2``), so the backends agree except possibly for pairs exactly at the
cutoff (torch_cluster).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings

import numpy as np
import torch
from torch import Tensor

from pyg_equireann.graph.checks import check_finite_positions
from pyg_equireann.graph.edges import image_shifts

__all__ = ["radius_graph", "radius_graph_pbc", "build_graph", "torch_cluster_available", "vesin_torch_available"]

#: Above this many within-graph candidate pairs (``sum_g n_g**2``) the ``"torch"`` backend
#: hands the largest graphs to vesin until the remainder fits.
TORCH_MAX_CANDIDATES: int = 20_000_000
#: Graphs with more atoms than this always go to vesin in the ``"torch"`` backend
#: (O(n) cell list beats the O(n**2) candidate enumeration there).
TORCH_MAX_GRAPH_ATOMS: int = 500
#: Candidate pairs processed per vectorised chunk (bounds peak memory of the torch backend).
TORCH_CHUNK_CANDIDATES: int = 1 << 22
#: The torch backend pads graphs to equal size (dense blocks, no gathers) when that costs at
#: most this many times the ``sum_g n_g**2`` candidates of the flat layout.
TORCH_DENSE_MAX_WASTE: float = 2.0

#: Threads for vesin (0 = all cores). 1 by default: on the 2-core machine a second thread
#: saved little (about 10 % for 10k atoms) and competes with torch's own thread pool.
VESIN_NUM_THREADS: int = 1

#: Pairs per atom vesin-torch's CUDA search may hold when its default capacity (``max(128,
#: cutoff**3)``) overflows: retried with 4x more each time up to this bound (dense or tiny cells).
VESIN_TORCH_MAX_PAIRS_PER_POINT: int = 1 << 16

_BACKENDS = ("auto", "torch", "torch_cluster", "vesin", "vesin_torch")
_TC_INSTALL_HINT = "pip install torch-cluster --no-build-isolation"
_GPU_INSTALL_HINT = 'pip install "pyg_equireann[gpu]"'


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    """True if the optional ``module`` is installed and imports (cached)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # broken build or wheel / torch ABI mismatch
        return False
    return True


def torch_cluster_available() -> bool:
    """True if the optional ``torch_cluster`` extension can be imported (cached)."""
    return _importable("torch_cluster")


def vesin_torch_available() -> bool:
    """True if the optional ``vesin_torch`` package (extra ``gpu``) can be imported (cached)."""
    return _importable("vesin_torch")


@functools.lru_cache(maxsize=None)
def _warn_cpu_fallback() -> None:
    """Warn once per process that CUDA positions take the CPU path."""
    warnings.warn(
        "vesin-torch is not installed: neighbour lists of CUDA positions fall back to the CPU path "
        "(periodic structures, and with the 'torch' backend molecules above TORCH_MAX_GRAPH_ATOMS atoms, are "
        "searched on the host); "
        f"install it with `{_GPU_INSTALL_HINT}`",
        RuntimeWarning,
        stacklevel=3,
    )


def _require_vesin_torch() -> None:
    if not vesin_torch_available():
        raise ValueError(
            "backend='vesin_torch' was requested but vesin-torch is not installed (or fails to import); "
            f"install it with `{_GPU_INSTALL_HINT}` (or `pip install vesin-torch`) or use backend='auto'"
        )


# --------------------------------------------------------------------------- validation


def _check_pos(pos: Tensor, batch: Tensor | None = None) -> None:
    if not isinstance(pos, Tensor):
        raise ValueError(f"pos must be a torch.Tensor of shape (N, 3), got {type(pos).__name__}")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape (N, 3), got {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise ValueError(f"pos must be a floating-point tensor, got dtype {pos.dtype}")
    if not (isinstance(batch, Tensor) and batch.shape == pos.shape[:1]):
        batch = None  # checked later, with its own error
    check_finite_positions(pos, batch)


def _check_cutoff(cutoff: float) -> float:
    cutoff = float(cutoff)
    if not np.isfinite(cutoff) or cutoff <= 0.0:
        raise ValueError(f"cutoff must be a positive finite number (Å), got {cutoff}")
    return cutoff


def _prepare_batch(pos: Tensor, batch: Tensor | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Validate ``batch``; return (batch, counts (G,), ptr (G+1,), G) on pos.device."""
    n = pos.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    else:
        if not isinstance(batch, Tensor):
            raise ValueError(f"batch must be a torch.Tensor of shape (N,), got {type(batch).__name__}")
        if batch.dim() != 1 or batch.shape[0] != n:
            raise ValueError(f"batch must have shape (N,) = ({n},), got {tuple(batch.shape)}")
        if batch.is_floating_point() or batch.dtype == torch.bool:
            raise ValueError(f"batch must be an integer tensor, got dtype {batch.dtype}")
        batch = batch.to(device=pos.device, dtype=torch.long)
        if n > 0:
            if int(batch[0]) < 0:
                raise ValueError(f"batch must be non-negative, got batch[0] = {int(batch[0])}")
            if n > 1 and not bool((batch[1:] >= batch[:-1]).all()):
                k = int((batch[1:] < batch[:-1]).nonzero()[0, 0])
                raise ValueError(
                    "batch must be sorted in non-decreasing order (as produced by PyG's Batch), "
                    f"but batch[{k}] = {int(batch[k])} > batch[{k + 1}] = {int(batch[k + 1])}"
                )
    num_graphs = int(batch[-1]) + 1 if n > 0 else 0
    counts = torch.bincount(batch, minlength=num_graphs)
    ptr = torch.zeros(num_graphs + 1, dtype=torch.long, device=pos.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return batch, counts, ptr, num_graphs


def _empty_edges(device: torch.device) -> Tensor:
    return torch.empty((2, 0), dtype=torch.long, device=device)


# --------------------------------------------------------------------------- helpers


def _sort_key_order(i: Tensor, j: Tensor, n: int) -> Tensor:
    """Permutation sorting edges by (centre i, neighbour j)."""
    key = i * max(n, 1) + j
    return torch.sort(key, stable=True).indices


def _keep_within(pos_t: Tensor, i: Tensor, j: Tensor, cutoff: float, shift: Tensor | None = None) -> Tensor:
    """Boolean mask ``|pos[j] - pos[i] (+ shift)|**2 <= cutoff**2`` evaluated in pos.dtype.

    ``pos_t`` is ``pos.t().contiguous()`` (3, N): per-coordinate 1-D ``take`` is much faster
    on CPU than ``pos[j]`` followed by ``.sum(dim=1)`` over 3 columns. ``shift``: (E, 3) or None.
    """
    d2 = None
    for k in range(3):
        col = pos_t[k]
        d = torch.take(col, j) - torch.take(col, i)
        if shift is not None:
            d += shift[:, k]
        d2 = d * d if d2 is None else d2.addcmul_(d, d)
    return d2 <= cutoff * cutoff


def _select(keep: Tensor, *tensors: Tensor) -> list[Tensor]:
    idx = keep.nonzero().squeeze(1)
    return [t.index_select(0, idx) for t in tensors]


def _vesin_margin(cutoff: float, scale: float) -> float:
    # vesin works in float64 on (possibly translated) coordinates; search slightly beyond
    # the cutoff, then apply the exact test in pos.dtype (covers float32 round-off).
    return 1e-5 * (cutoff + scale) + 1e-9


def _vesin_neighbor_list(cutoff: float):
    try:
        import vesin
    except ImportError as exc:  # pragma: no cover - vesin is a hard dependency
        raise ImportError("pyg_equireann.graph.neighbors needs `vesin` (pip install vesin)") from exc
    return vesin.NeighborList(cutoff=cutoff, full_list=True, sorted=False, n_threads=VESIN_NUM_THREADS)


def _separate_graphs(pos64: Tensor, batch: Tensor, num_graphs: int, cutoff: float) -> tuple[Tensor, float]:
    """Translate graphs apart along x so a non-periodic search sees no cross-graph pairs.

    ``pos64``: (n, 3) float64 atoms of ``batch`` (n,) sorted ids ``< num_graphs`` (any device).
    Returns the translated positions (gaps > cutoff + margin between graphs) and the search margin
    (:func:`_vesin_margin` of the largest graph extent). One host synchronisation.
    """
    idx = batch.unsqueeze(1).expand(-1, 3)
    lo = pos64.new_full((num_graphs, 3), math.inf).scatter_reduce(0, idx, pos64, "amin")
    hi = pos64.new_full((num_graphs, 3), -math.inf).scatter_reduce(0, idx, pos64, "amax")
    present = torch.isfinite(lo[:, :1])
    lo, hi = lo.where(present, 0.0), hi.where(present, 0.0)
    margin = _vesin_margin(cutoff, float((hi - lo).max()))
    if num_graphs > 1:
        width = (hi[:, 0] - lo[:, 0] + (2.0 * (cutoff + margin) + 1.0)).where(present[:, 0], 0.0)
        shift = -lo
        shift[:, 0] += torch.cumsum(width, 0) - width
        pos64 = pos64 + shift.index_select(0, batch)
    return pos64, margin


def _vesin_nonperiodic_pairs(pos64: Tensor, batch: Tensor, num_graphs: int, cutoff: float) -> tuple[Tensor, Tensor]:
    """Candidate pairs (i, j) within each graph, one vesin call (CPU) for all graphs.

    ``pos64``: (n, 3) float64 CPU atoms of ``batch`` (n,) sorted ids ``< num_graphs``.
    Returns int64 local indices (CPU; candidates up to cutoff + margin).
    """
    if pos64.shape[0] < 2:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    shifted, margin = _separate_graphs(pos64, batch, num_graphs, cutoff)
    nl = _vesin_neighbor_list(cutoff + margin)
    i, j = nl.compute(shifted.numpy(), np.zeros((3, 3)), False, "ij")
    return torch.from_numpy(i.astype(np.int64)), torch.from_numpy(j.astype(np.int64))


def _vesin_subset(
    pos: Tensor, batch: Tensor, node_idx: Tensor | None, cutoff: float, num_graphs: int, on_device: bool
) -> tuple[Tensor, Tensor]:
    """Non-periodic candidate pairs (i, j) (global indices, on pos.device) of the atoms ``node_idx``
    (None: all) in one call: vesin-torch on pos.device, or vesin on the CPU."""
    sub = pos if node_idx is None else pos[node_idx]
    bsub = batch if node_idx is None else batch[node_idx]
    if on_device:
        i, j = _vesin_torch_pairs(sub, bsub, num_graphs, cutoff)
    else:
        i, j = _vesin_nonperiodic_pairs(sub.detach().to("cpu", torch.float64), bsub.cpu(), num_graphs, cutoff)
        i, j = i.to(pos.device), j.to(pos.device)
    if node_idx is not None:
        i, j = node_idx[i], node_idx[j]
    return i, j


@functools.lru_cache(maxsize=8)
def _vesin_torch_list(cutoff: float):
    # cached: on CUDA the calculator keeps its device buffers between calls
    import vesin_torch

    return vesin_torch.NeighborList(cutoff=cutoff, full_list=True, sorted=False, n_threads=VESIN_NUM_THREADS)


def _vesin_torch_compute(cutoff: float, margin: float, points: Tensor, box: Tensor, periodic, quantities: str):
    """vesin-torch search within ``cutoff + margin`` on the device of ``points`` (float64).

    The margin is rounded up to a power of two so that calls with nearby margins share one cached
    calculator. A CUDA pair-buffer overflow (dense or tiny cells) is retried with 4x the capacity.
    """
    nl = _vesin_torch_list(cutoff + 2.0 ** math.ceil(math.log2(margin)))
    previous = os.environ.get("VESIN_CUDA_MAX_PAIRS_PER_POINT")
    capacity = int(previous) if previous else max(128, math.ceil(cutoff**3))  # vesin's default
    try:
        while True:
            try:
                return nl.compute(points, box, periodic, quantities)
            except RuntimeError as exc:
                capacity *= 4
                if "VESIN_CUDA_MAX_PAIRS_PER_POINT" not in str(exc) or capacity > VESIN_TORCH_MAX_PAIRS_PER_POINT:
                    raise
                os.environ["VESIN_CUDA_MAX_PAIRS_PER_POINT"] = str(capacity)
    finally:
        if os.environ.get("VESIN_CUDA_MAX_PAIRS_PER_POINT") != previous:
            if previous is None:
                del os.environ["VESIN_CUDA_MAX_PAIRS_PER_POINT"]
            else:
                os.environ["VESIN_CUDA_MAX_PAIRS_PER_POINT"] = previous


def _vesin_torch_pairs(pos: Tensor, batch: Tensor, num_graphs: int, cutoff: float) -> tuple[Tensor, Tensor]:
    """Non-periodic candidate pairs (i, j) of all graphs, one vesin-torch call on pos.device."""
    shifted, margin = _separate_graphs(pos.detach().to(torch.float64), batch, num_graphs, cutoff)
    box = shifted.new_zeros((3, 3))
    i, j = _vesin_torch_compute(cutoff, margin, shifted, box, False, "ij")
    return i, j


# --------------------------------------------------------------------------- backends


def _pairs_flat(pos: Tensor, cutoff: float, batch: Tensor, counts: Tensor, ptr: Tensor, small: Tensor):
    """Candidates = every (centre i, atom j of i's graph) for graphs in ``small``, flat layout.

    Exactly ``sum_g n_g**2`` candidates, processed in chunks of centres. Returns (j, i)
    sorted by i then j.
    """
    n = pos.shape[0]
    device = pos.device
    deg = (counts * small)[batch]  # candidates per centre (its graph size, 0 if not handled)
    first = ptr[:-1][batch]  # first atom of each centre's graph
    cum = torch.cumsum(deg, 0)
    total = int(cum[-1])
    pos_t = pos.t().contiguous()
    bounds: list[int] = []
    if total > TORCH_CHUNK_CANDIDATES:
        targets = torch.arange(TORCH_CHUNK_CANDIDATES, total, TORCH_CHUNK_CANDIDATES, device=device)
        bounds = sorted({b for b in (torch.searchsorted(cum, targets) + 1).tolist() if 0 < b < n})
    src, dst = [], []
    a = 0
    for b in bounds + [n]:
        deg_c = deg[a:b]
        tot_c = int(cum[b - 1]) - (int(cum[a - 1]) if a > 0 else 0)
        if tot_c > 0:
            centre = torch.repeat_interleave(torch.arange(a, b, device=device), deg_c, output_size=tot_c)
            start = torch.cumsum(deg_c, 0) - deg_c
            nbr = torch.repeat_interleave(first[a:b] - start, deg_c, output_size=tot_c)
            nbr += torch.arange(tot_c, device=device)
            keep = _keep_within(pos_t, centre, nbr, cutoff) & (nbr != centre)
            nbr, centre = _select(keep, nbr, centre)
            src.append(nbr)
            dst.append(centre)
        a = b
    return src, dst


def _pairs_dense(pos: Tensor, cutoff: float, batch: Tensor, counts: Tensor, ptr: Tensor, small: Tensor):
    """Same candidates as :func:`_pairs_flat`, as padded (graph, n_max, n_max) blocks.

    Only graphs in ``small`` are padded (to their largest size); no gathers are needed, which
    makes this faster when the graphs have similar sizes. Returns (j, i) sorted by i then j.
    """
    graph_ids = small.nonzero().squeeze(1)
    n_max = int(counts[graph_ids].max())
    rank = torch.cumsum(small.long(), 0) - 1  # position of each handled graph in the padding
    node = small[batch].nonzero().squeeze(1)
    g_node = batch.index_select(0, node)
    local = node - ptr.index_select(0, g_node)
    pad = pos.new_full((3, graph_ids.numel(), n_max), float("inf"))  # inf - inf = nan: never kept
    pad[:, rank.index_select(0, g_node), local] = pos.index_select(0, node).t()
    step = max(1, TORCH_CHUNK_CANDIDATES // (n_max * n_max))
    c2 = cutoff * cutoff
    src, dst = [], []
    for g0 in range(0, graph_ids.numel(), step):
        blk = pad[:, g0 : g0 + step]
        d2 = None
        for k in range(3):
            col = blk[k]
            d = col.unsqueeze(2) - col.unsqueeze(1)  # [g, a, b] = x_b - x_a
            d2 = d * d if d2 is None else d2.addcmul_(d, d)
        d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        g, ia, jb = (d2 <= c2).nonzero(as_tuple=True)
        base = ptr.index_select(0, graph_ids.index_select(0, g + g0))
        src.append(base + jb)
        dst.append(base + ia)
    return src, dst


def _radius_torch(pos: Tensor, cutoff: float, batch: Tensor, counts: Tensor, ptr: Tensor, on_device: bool) -> Tensor:
    n = pos.shape[0]
    device = pos.device
    sq = counts * counts
    large = counts > TORCH_MAX_GRAPH_ATOMS
    if int(sq.sum()) > TORCH_MAX_CANDIDATES:
        # keep the smallest graphs on torch while their sum of n_g**2 fits
        order = torch.argsort(sq)
        fits = torch.cumsum(sq[order], 0) <= TORCH_MAX_CANDIDATES
        fit = torch.zeros_like(large)
        fit[order[fits]] = True
        large |= ~fit
    large &= counts > 1
    small = (counts > 1) & ~large
    any_large = bool(large.any())

    src_parts: list[Tensor] = []
    dst_parts: list[Tensor] = []
    num_small = int(small.sum())
    if num_small > 0:
        total = int((sq * small).sum())
        n_max = int(counts[small].max())
        if num_small * n_max * n_max <= TORCH_DENSE_MAX_WASTE * total:
            src_parts, dst_parts = _pairs_dense(pos, cutoff, batch, counts, ptr, small)
        else:
            src_parts, dst_parts = _pairs_flat(pos, cutoff, batch, counts, ptr, small)

    if any_large:
        # all graphs with pairs are large: hand the whole batch over (no subset gathers)
        node_idx = None if num_small == 0 else large[batch].nonzero().squeeze(1)
        i, j = _vesin_subset(pos, batch, node_idx, cutoff, counts.numel(), on_device)
        i, j = _select(_keep_within(pos.t().contiguous(), i, j, cutoff), i, j)
        src_parts.append(j)
        dst_parts.append(i)

    if not src_parts:
        return _empty_edges(device)
    src = torch.cat(src_parts) if len(src_parts) > 1 else src_parts[0]
    dst = torch.cat(dst_parts) if len(dst_parts) > 1 else dst_parts[0]
    if any_large:  # vesin pairs come unsorted
        perm = _sort_key_order(dst, src, n)
        src, dst = src[perm], dst[perm]
    return torch.stack([src, dst])


def _radius_vesin(pos: Tensor, cutoff: float, batch: Tensor, num_graphs: int, on_device: bool) -> Tensor:
    """One vesin search for the whole batch: vesin-torch on pos.device, or vesin on the CPU."""
    i, j = _vesin_subset(pos, batch, None, cutoff, num_graphs, on_device)
    i, j = _select(_keep_within(pos.t().contiguous(), i, j, cutoff), i, j)
    perm = _sort_key_order(i, j, pos.shape[0])
    return torch.stack([j[perm], i[perm]])


def _radius_torch_cluster(pos: Tensor, cutoff: float, batch: Tensor | None, counts: Tensor) -> Tensor:
    import torch_cluster

    n = pos.shape[0]
    if n < 2:
        return _empty_edges(pos.device)
    max_nb = int(counts.max())  # a centre cannot have more neighbours than its graph size - 1
    edge_index = torch_cluster.radius_graph(
        pos, r=cutoff, batch=batch, loop=False, max_num_neighbors=max_nb, flow="source_to_target"
    )
    j, i = edge_index[0], edge_index[1]
    i, j = _select((i != j) & _keep_within(pos.t().contiguous(), i, j, cutoff), i, j)
    perm = _sort_key_order(i, j, n)
    return torch.stack([j[perm], i[perm]])


# --------------------------------------------------------------------------- public API


def radius_graph(pos: Tensor, cutoff: float, batch: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Full (both directions) neighbour list of non-periodic structures.

    Args:
        pos: ``(N, 3)`` positions in Å (float32 or float64).
        cutoff: cutoff radius in Å; pairs with ``|pos[j] - pos[i]| <= cutoff`` are kept.
        batch: ``(N,)`` sorted graph index per atom, or ``None`` (single graph).
        backend: ``"auto"`` | ``"torch"`` | ``"torch_cluster"`` | ``"vesin"`` | ``"vesin_torch"``.

    Returns:
        ``edge_index`` ``(2, E)`` long on ``pos.device``: row 0 = neighbour ``j`` (source),
        row 1 = centre ``i`` (target), ``i != j``, same graph only, sorted by ``i`` then ``j``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose one of {_BACKENDS}")
    _check_pos(pos, batch)
    cutoff = _check_cutoff(cutoff)
    if backend == "auto":
        # On CPU the "torch" backend was measured fastest (torch_cluster 2.2x slower, vesin-torch 2-4x
        # slower for small molecules, docs/neighbors.md). CUDA tensors stay on the device: "torch" with
        # its large graphs through vesin-torch, else torch_cluster, else "torch" with a warning.
        if pos.is_cuda and not vesin_torch_available():
            _warn_cpu_fallback()
            backend = "torch_cluster" if torch_cluster_available() else "torch"
        else:
            backend = "torch"
    elif backend == "torch_cluster" and not torch_cluster_available():
        raise ValueError(
            "backend='torch_cluster' was requested but torch_cluster is not installed (or fails to "
            f"import); install it with `{_TC_INSTALL_HINT}` or use backend='torch'"
        )
    elif backend == "vesin_torch":
        _require_vesin_torch()
    with torch.no_grad():
        batch_in = batch
        batch, counts, ptr, num_graphs = _prepare_batch(pos, batch)
        if pos.shape[0] < 2:
            return _empty_edges(pos.device)
        if backend == "torch":
            return _radius_torch(pos, cutoff, batch, counts, ptr, pos.is_cuda and vesin_torch_available())
        if backend in ("vesin", "vesin_torch"):
            return _radius_vesin(pos, cutoff, batch, num_graphs, backend == "vesin_torch")
        return _radius_torch_cluster(pos, cutoff, None if batch_in is None else batch, counts)


def _prepare_cell_pbc(
    cell: Tensor, pbc: Tensor | bool | None, num_graphs: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Return cell (G, 3, 3) and pbc (G, 3) bool, validated."""
    if not isinstance(cell, Tensor):
        cell = torch.as_tensor(cell)
    if cell.dim() == 2 and cell.shape == (3, 3):
        cell = cell.unsqueeze(0).expand(max(num_graphs, 1), 3, 3)
    elif cell.dim() == 3 and cell.shape[1:] == (3, 3):
        if cell.shape[0] < num_graphs:
            raise ValueError(
                f"cell has {cell.shape[0]} entries but batch has {num_graphs} graphs; "
                "cell must have shape (3, 3) or (B, 3, 3) with one cell per graph"
            )
    else:
        raise ValueError(
            f"cell must have shape (3, 3) or (B, 3, 3) (rows = lattice vectors, Å), got {tuple(cell.shape)}"
        )
    if not bool(torch.isfinite(cell).all()):
        raise ValueError("cell contains non-finite values (NaN or inf)")
    g = cell.shape[0]
    if pbc is None:
        pbc_t = torch.ones((g, 3), dtype=torch.bool)
    else:
        pbc_t = torch.as_tensor(pbc).to("cpu")
        if pbc_t.dim() == 0:
            pbc_t = pbc_t.reshape(1).expand(3)
        if pbc_t.dim() == 1 and pbc_t.shape[0] == 3:
            pbc_t = pbc_t.unsqueeze(0).expand(g, 3)
        elif not (pbc_t.dim() == 2 and pbc_t.shape[1] == 3 and pbc_t.shape[0] == g):
            raise ValueError(f"pbc must have shape (3,) or (B, 3) with B = {g} (bool), got {tuple(pbc_t.shape)}")
        pbc_t = pbc_t.to(torch.bool)
    return cell, pbc_t


def radius_graph_pbc(
    pos: Tensor,
    cutoff: float,
    batch: Tensor | None,
    cell: Tensor,
    pbc: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Periodic neighbour list (vesin cell list).

    Args:
        pos: ``(N, 3)`` positions in Å (need not be wrapped into the cell).
        cutoff: cutoff radius in Å.
        batch: ``(N,)`` sorted graph index per atom, or ``None`` (single graph).
        cell: ``(B, 3, 3)`` or ``(3, 3)``; rows are lattice vectors in Å.
        pbc: ``(B, 3)`` or ``(3,)`` bool periodicity per direction; default all ``True``.
        backend: ``"vesin_torch"`` searches on ``pos.device`` (vesin-torch), ``"auto"`` does so
            for CUDA tensors when vesin-torch is installed; otherwise (and for every other
            backend name) vesin on the CPU in float64.

    Returns:
        ``edge_index`` ``(2, E)`` long (row 0 = neighbour ``j``, row 1 = centre ``i``) and
        ``cell_offsets`` ``(E, 3)`` (integer values, ``pos.dtype``) with
        ``r_ij = pos[j] - pos[i] + cell_offsets @ cell[batch[i]]``, ``|r_ij| <= cutoff``.
        All periodic images are included (also ``j == i`` with a nonzero offset, and several
        images of one neighbour), so cells smaller than ``2 * cutoff`` work; only
        ``(i, i, 0)`` is excluded. Non-periodic directions have offset 0. Sorted by centre
        ``i``, then ``j``, then offset.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose one of {_BACKENDS}")
    _check_pos(pos, batch)
    cutoff = _check_cutoff(cutoff)
    if backend == "vesin_torch":
        _require_vesin_torch()
    on_device = backend == "vesin_torch" or (backend == "auto" and pos.is_cuda and vesin_torch_available())
    if backend == "auto" and pos.is_cuda and not on_device:
        _warn_cpu_fallback()
    device, dtype = pos.device, pos.dtype
    with torch.no_grad():
        batch, counts, ptr, num_graphs = _prepare_batch(pos, batch)
        cell_g, pbc_g = _prepare_cell_pbc(cell, pbc, num_graphs, device)
        n = pos.shape[0]
        if n == 0:
            return _empty_edges(device), torch.zeros((0, 3), dtype=dtype, device=device)
        nonper = ~pbc_g[:num_graphs].numpy().any(axis=1)  # graphs without any periodic direction
        search = _pbc_pairs_vesin_torch if on_device else _pbc_pairs_vesin
        i, j, s = search(pos, cutoff, batch, ptr, num_graphs, cell_g, pbc_g, nonper)
        if i.numel() == 0:
            return _empty_edges(device), torch.zeros((0, 3), dtype=dtype, device=device)
        perm = _edge_order(i, j, s, n)
        i, j, s = i.index_select(0, perm), j.index_select(0, perm), s.index_select(0, perm)

        i, j = i.to(device), j.to(device)
        off = s.to(device=device, dtype=dtype)
        cell_t = cell_g.to(device=device, dtype=dtype)
        periodic_graphs = np.flatnonzero(~nonper)
        edge_index = torch.stack([j, i])
        if len(periodic_graphs) == 1 and not nonper.any():
            shift = image_shifts(edge_index, off, cell_t[int(periodic_graphs[0])])
        else:
            shift = image_shifts(edge_index, off, cell_t, batch)
        keep = _keep_within(pos.t().contiguous(), i, j, cutoff, shift)
        keep &= (i != j) | (off != 0).any(dim=1)  # no (i, i, 0) pair (vesin never returns it; be safe)
        if not bool(keep.all()):
            i, j, off = _select(keep, i, j, off)
            edge_index = torch.stack([j, i])
        return edge_index, off


def _zero_vector_error(g: int, box, per) -> ValueError:
    d = next(d for d in range(3) if per[d] and not np.linalg.norm(box[d]) > 0.0)
    return ValueError(f"cell of graph {g} has a zero lattice vector {d} in a periodic direction: {box.tolist()}")


def _pbc_failed(g: int, box, per, exc: Exception) -> ValueError:
    return ValueError(f"periodic neighbour list failed for graph {g} (cell {box.tolist()}, pbc {per.tolist()}): {exc}")


def _pbc_pairs_vesin(pos, cutoff, batch, ptr, num_graphs, cell_g, pbc_g, nonper):
    """Candidate (i, j, integer shift) of :func:`radius_graph_pbc` with vesin on the CPU (float64).

    One vesin call per periodic graph; graphs without a periodic direction share one call.
    Returns CPU tensors (long (E,), long (E,), long (E, 3)).
    """
    pos64 = pos.detach().to("cpu", torch.float64)
    cell64 = cell_g.detach().to("cpu", torch.float64).numpy()
    pbc_np = pbc_g.numpy()
    ptr_l = ptr.tolist()
    batch_cpu = batch.cpu()

    i_parts, j_parts, s_parts = [], [], []
    if nonper.any():
        idx = torch.from_numpy(nonper)[batch_cpu].nonzero().squeeze(1)
        i, j = _vesin_nonperiodic_pairs(pos64[idx], batch_cpu[idx], num_graphs, cutoff)
        i_parts.append(idx[i])
        j_parts.append(idx[j])
        s_parts.append(torch.zeros((len(i), 3), dtype=torch.long))
    pos64 = pos64.numpy()
    for g in np.flatnonzero(~nonper).tolist():
        a, b = ptr_l[g], ptr_l[g + 1]
        if a == b:
            continue
        p = pos64[a:b]
        box = cell64[g]
        per = pbc_np[g]
        if not (np.linalg.norm(box, axis=1) > 0.0)[per].all():
            raise _zero_vector_error(g, box, per)
        scale = float(np.abs(p).max()) + float(np.linalg.norm(box, axis=1).sum())
        nl = _vesin_neighbor_list(cutoff + _vesin_margin(cutoff, scale))
        try:
            i, j, s = nl.compute(p, box, [bool(x) for x in per], "ijS")
        except RuntimeError as exc:
            raise _pbc_failed(g, box, per, exc) from exc
        i_parts.append(torch.from_numpy(i.astype(np.int64)) + a)
        j_parts.append(torch.from_numpy(j.astype(np.int64)) + a)
        s_parts.append(torch.from_numpy(s.astype(np.int64)))
    return _cat_parts(i_parts, j_parts, s_parts, torch.device("cpu"))


def _pbc_pairs_vesin_torch(pos, cutoff, batch, ptr, num_graphs, cell_g, pbc_g, nonper):
    """Candidate (i, j, integer shift) of :func:`radius_graph_pbc` with vesin-torch on pos.device.

    Graphs without a periodic direction share one call; each periodic graph gets its own call (its
    own cell). Host synchronisations: one for all graphs' sizes, margins and lattice-vector norms,
    plus those inside vesin-torch (its output size), once per call.
    """
    device = pos.device
    pos64 = pos.detach().to(torch.float64)
    cell64 = cell_g[:num_graphs].detach().to(device=device, dtype=torch.float64)
    pbc_np = pbc_g.numpy()
    i_parts, j_parts, s_parts = [], [], []
    if nonper.any():
        node = torch.from_numpy(nonper).to(device)[batch].nonzero().squeeze(1)
        if node.numel() > 1:
            i, j = _vesin_torch_pairs(pos64.index_select(0, node), batch.index_select(0, node), num_graphs, cutoff)
            i_parts.append(node.index_select(0, i))
            j_parts.append(node.index_select(0, j))
            s_parts.append(torch.zeros((i.numel(), 3), dtype=torch.long, device=device))
    periodic = np.flatnonzero(~nonper)
    if len(periodic):
        # sizes, |x| bounds and lattice-vector norms of every graph in one host transfer
        idx = batch.unsqueeze(1)
        absmax = pos64.new_zeros((num_graphs, 1)).scatter_reduce(0, idx, pos64.abs().amax(1, keepdim=True), "amax")
        norms = torch.linalg.vector_norm(cell64, dim=2)
        host = torch.cat([ptr[:-1, None].to(torch.float64), ptr[1:, None].to(torch.float64), absmax, norms], 1)
        host = host.cpu().numpy()
        pbc_dev = pbc_g[:num_graphs].to(device)
        for g in periodic.tolist():
            a, b = int(host[g, 0]), int(host[g, 1])
            if a == b:
                continue
            per = pbc_np[g]
            if not (host[g, 3:] > 0.0)[per].all():
                raise _zero_vector_error(g, cell64[g].cpu().numpy(), per)
            margin = _vesin_margin(cutoff, float(host[g, 2] + host[g, 3:].sum()))
            try:
                i, j, s = _vesin_torch_compute(cutoff, margin, pos64[a:b], cell64[g], pbc_dev[g], "ijS")
            except RuntimeError as exc:
                raise _pbc_failed(g, cell64[g].cpu().numpy(), per, exc) from exc
            i_parts.append(i + a)
            j_parts.append(j + a)
            s_parts.append(s.long())
    return _cat_parts(i_parts, j_parts, s_parts, device)


def _cat_parts(i_parts, j_parts, s_parts, device):
    if not i_parts:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, torch.empty((0, 3), dtype=torch.long, device=device)
    if len(i_parts) == 1:
        return i_parts[0], j_parts[0], s_parts[0]
    return torch.cat(i_parts), torch.cat(j_parts), torch.cat(s_parts)


def _edge_order(i: Tensor, j: Tensor, s: Tensor, n: int) -> Tensor:
    """Permutation ordering edges by (i, j, s0, s1, s2); one int64 key when it fits."""
    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=i.device)
    m = int(s.abs().max())
    k = 2 * m + 1
    if float(n) * n * k**3 < 2**62:
        code = ((s[:, 0] + m) * k + (s[:, 1] + m)) * k + (s[:, 2] + m)
        return torch.sort((i * n + j) * k**3 + code).indices
    perm = torch.arange(i.numel(), device=i.device)
    for key in (s[:, 2], s[:, 1], s[:, 0], j, i):  # least significant first, stable sorts
        perm = perm.index_select(0, torch.sort(key.index_select(0, perm), stable=True).indices)
    return perm


def build_graph(
    pos: Tensor,
    cutoff: float,
    batch: Tensor | None = None,
    cell: Tensor | None = None,
    pbc: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Neighbour list for a batch, periodic or not.

    If ``cell`` is ``None`` or ``pbc`` is all ``False``: ``(radius_graph(pos, cutoff, batch,
    backend), None)``. Otherwise ``radius_graph_pbc(pos, cutoff, batch, cell, pbc, backend)``
    (vesin-torch on the device for ``"vesin_torch"``, and for ``"auto"`` with CUDA tensors; vesin
    on the CPU otherwise), which also handles batches mixing periodic and non-periodic graphs.
    Shapes/units as in those functions: ``edge_index`` ``(2, E)``, ``cell_offsets`` ``(E, 3)``.
    """
    if cell is None:
        return radius_graph(pos, cutoff, batch, backend), None
    if pbc is not None and not bool(torch.as_tensor(pbc).any()):
        return radius_graph(pos, cutoff, batch, backend), None
    return radius_graph_pbc(pos, cutoff, batch, cell, pbc, backend)
