"""Tests for pyg_equireann.graph.neighbors (float64, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

from pyg_equireann.graph import neighbors as nb
from pyg_equireann.graph.neighbors import build_graph, radius_graph, radius_graph_pbc

DT = torch.float64


# --------------------------------------------------------------------------- helpers


def random_molecules(sizes, seed=0, density=0.05):
    """Random 'molecules' (uniform in a box with ~density atoms/Å^3), all near the origin."""
    rng = np.random.default_rng(seed)
    pos, batch = [], []
    for g, n in enumerate(sizes):
        box = (max(n, 1) / density) ** (1 / 3)
        pos.append(rng.random((n, 3)) * box)
        batch += [g] * n
    return torch.tensor(np.concatenate(pos), dtype=DT), torch.tensor(batch, dtype=torch.long)


def brute_force_pairs(pos, batch, cutoff):
    """Set of (i, j) with same graph, i != j, |r_ij| <= cutoff (dense N x N)."""
    d = torch.cdist(pos, pos)
    ok = (d <= cutoff) & (batch[:, None] == batch[None, :])
    ok.fill_diagonal_(False)
    i, j = ok.nonzero(as_tuple=True)
    return set(zip(i.tolist(), j.tolist()))


def edge_set(edge_index, offsets=None):
    j, i = edge_index.tolist()
    if offsets is None:
        return set(zip(i, j))
    s = [tuple(int(round(x)) for x in row) for row in offsets.tolist()]
    return set(zip(i, j, s))


def ase_set(pos, cutoff, cell=None, pbc=False, start=0):
    """ASE reference as a set of (i, j, offset) (or (i, j) when non-periodic)."""
    atoms = Atoms(
        numbers=[1] * len(pos), positions=np.asarray(pos), cell=np.zeros((3, 3)) if cell is None else cell, pbc=pbc
    )
    i, j, S = neighbor_list("ijS", atoms, cutoff)
    if cell is None:
        return set(zip((i + start).tolist(), (j + start).tolist()))
    return set(zip((i + start).tolist(), (j + start).tolist(), map(tuple, S.tolist())))


def assert_sorted_by_centre(edge_index):
    key = edge_index[1] * (int(edge_index.max()) + 1 if edge_index.numel() else 1) + edge_index[0]
    assert bool((key[1:] >= key[:-1]).all())


def assert_within_cutoff(pos, edge_index, cutoff, offsets=None, cell=None, batch=None):
    j, i = edge_index
    r = pos[j] - pos[i]
    if offsets is not None:
        cell = cell if cell.dim() == 3 else cell.unsqueeze(0)
        b = torch.zeros_like(i) if batch is None else batch[i]
        r = r + torch.einsum("ek,ekl->el", offsets, cell[b])
        assert torch.equal(offsets, offsets.round())
    assert bool((r.norm(dim=1) <= cutoff).all())


def triclinic_cell():
    return torch.tensor([[2.1, 0.0, 0.0], [1.3, 1.9, 0.0], [-0.7, 0.6, 2.4]], dtype=DT)


# --------------------------------------------------------------------------- non-periodic


@pytest.mark.parametrize("backend", ["torch", "vesin"])
def test_batch_of_molecules_vs_bruteforce_and_ase(backend):
    sizes = [21, 7, 1, 2, 33, 21, 15, 4]
    pos, batch = random_molecules(sizes, seed=1)
    cutoff = 4.0
    ei = radius_graph(pos, cutoff, batch, backend=backend)
    assert ei.dtype == torch.long and ei.shape[0] == 2
    assert bool((ei[0] != ei[1]).all())
    assert torch.equal(batch[ei[0]], batch[ei[1]])
    assert_sorted_by_centre(ei)
    assert_within_cutoff(pos, ei, cutoff)
    ref = brute_force_pairs(pos, batch, cutoff)
    assert edge_set(ei) == ref
    assert len(ref) == ei.shape[1]  # no duplicates
    # ASE per graph
    ptr = np.r_[0, np.cumsum(sizes)]
    ase_all = set()
    for g in range(len(sizes)):
        ase_all |= ase_set(pos[ptr[g] : ptr[g + 1]], cutoff, start=ptr[g])
    assert edge_set(ei) == ase_all


def test_backends_identical_and_float32():
    pos, batch = random_molecules([21] * 32, seed=2)
    for cutoff in (4.0, 5.0):
        e_t = radius_graph(pos, cutoff, batch, backend="torch")
        e_v = radius_graph(pos, cutoff, batch, backend="vesin")
        assert torch.equal(e_t, e_v)
        e32 = radius_graph(pos.float(), cutoff, batch, backend="torch")
        assert torch.equal(e32, radius_graph(pos.float(), cutoff, batch, backend="vesin"))
        assert edge_set(e32) == edge_set(e_t)  # no exact ties in random data


def test_batch_none_single_graph():
    pos, _ = random_molecules([40], seed=3)
    ei = radius_graph(pos, 3.0, None, backend="torch")
    assert edge_set(ei) == brute_force_pairs(pos, torch.zeros(40, dtype=torch.long), 3.0)
    assert torch.equal(ei, radius_graph(pos, 3.0, None, backend="vesin"))


def test_gapped_batch_ids():
    # graph ids may skip values (empty graphs in the batch)
    pos, _ = random_molecules([10, 12], seed=4)
    batch = torch.tensor([0] * 10 + [3] * 12)
    ei = radius_graph(pos, 4.0, batch, backend="torch")
    assert edge_set(ei) == brute_force_pairs(pos, batch, 4.0)
    assert torch.equal(ei, radius_graph(pos, 4.0, batch, backend="vesin"))


@pytest.mark.parametrize("backend", ["torch", "vesin"])
def test_empty_single_atom_and_isolated(backend):
    for n in (0, 1):
        ei = radius_graph(torch.zeros((n, 3), dtype=DT), 5.0, backend=backend)
        assert ei.shape == (2, 0) and ei.dtype == torch.long
    far = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], dtype=DT)
    assert radius_graph(far, 5.0, backend=backend).shape == (2, 0)
    # a single-atom graph next to a normal one
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=DT)
    ei = radius_graph(pos, 5.0, torch.tensor([0, 1, 1]), backend=backend)
    assert edge_set(ei) == {(1, 2), (2, 1)}


def test_vesin_fallback_for_large_graph(monkeypatch):
    sizes = [21, 300, 5, 21]
    pos, batch = random_molecules(sizes, seed=5)
    calls = []
    orig = nb._vesin_subset

    def spy(pos_, batch_, node_idx, *args):
        calls.append(None if node_idx is None else node_idx.numel())
        return orig(pos_, batch_, node_idx, *args)

    monkeypatch.setattr(nb, "_vesin_subset", spy)
    monkeypatch.setattr(nb, "TORCH_MAX_GRAPH_ATOMS", 100)
    ei = radius_graph(pos, 4.0, batch, backend="torch")
    assert calls == [300]
    ref = brute_force_pairs(pos, batch, 4.0)
    assert edge_set(ei) == ref and ei.shape[1] == len(ref)
    assert_sorted_by_centre(ei)
    assert torch.equal(ei, radius_graph(pos, 4.0, batch, backend="vesin"))
    # only one (large) graph: everything through vesin, still sorted
    big = pos[batch == 1]
    e_big = radius_graph(big, 4.0, None, backend="torch")
    assert_sorted_by_centre(e_big)
    assert edge_set(e_big) == brute_force_pairs(big, torch.zeros(300, dtype=torch.long), 4.0)
    # total-candidate limit: the largest graphs move to vesin until the rest fits
    monkeypatch.setattr(nb, "TORCH_MAX_GRAPH_ATOMS", 10**9)
    monkeypatch.setattr(nb, "TORCH_MAX_CANDIDATES", 2 * 21 * 21 + 25)
    calls.clear()
    ei2 = radius_graph(pos, 4.0, batch, backend="torch")
    assert calls == [300]
    assert torch.equal(ei, ei2)
    # with CUDA positions and vesin-torch installed the large graphs go to vesin-torch on the device
    batch_, counts, ptr, _ = nb._prepare_batch(pos, batch)
    assert torch.equal(nb._radius_torch(pos, 4.0, batch_, counts, ptr, on_device=True), ei)


@pytest.mark.parametrize("layout", ["flat", "dense"])
@pytest.mark.parametrize("chunk", [1 << 22, 97])
def test_torch_backend_layouts_and_chunking(monkeypatch, layout, chunk):
    pos, batch = random_molecules([21, 50, 3, 1, 80, 2], seed=6)
    ref = brute_force_pairs(pos, batch, 4.5)
    monkeypatch.setattr(nb, "TORCH_DENSE_MAX_WASTE", 0.0 if layout == "flat" else 1e9)
    monkeypatch.setattr(nb, "TORCH_CHUNK_CANDIDATES", chunk)
    called = []
    orig = getattr(nb, f"_pairs_{layout}")
    monkeypatch.setattr(nb, f"_pairs_{layout}", lambda *a: called.append(1) or orig(*a))
    ei = radius_graph(pos, 4.5, batch, backend="torch")
    assert called
    assert edge_set(ei) == ref and ei.shape[1] == len(ref)
    assert_sorted_by_centre(ei)
    assert torch.equal(ei, radius_graph(pos, 4.5, batch, backend="vesin"))


def test_torch_cluster_backend_matches():
    """With the optional torch_cluster installed, its edges equal the torch backend's; without it,
    asking for it gives the install hint (the other branch is run in a venv that has it)."""
    pos, batch = random_molecules([21] * 16 + [3, 1, 60], seed=7)
    if not nb.torch_cluster_available():
        with pytest.raises(ValueError, match="pip install torch-cluster"):
            radius_graph(pos, 4.0, batch, backend="torch_cluster")
        assert torch.equal(radius_graph(pos, 4.0, batch, backend="auto"), radius_graph(pos, 4.0, batch, backend="torch"))
        return
    for cutoff in (4.0, 5.0):
        ref = radius_graph(pos, cutoff, batch, backend="torch")
        assert torch.equal(radius_graph(pos, cutoff, batch, backend="torch_cluster"), ref)
        assert torch.equal(radius_graph(pos, cutoff, batch, backend="auto"), ref)
    p1, _ = random_molecules([30], seed=8)
    assert torch.equal(radius_graph(p1, 4.0, backend="torch_cluster"), radius_graph(p1, 4.0, backend="torch"))


def test_auto_without_torch_cluster(monkeypatch):
    monkeypatch.setattr(nb, "torch_cluster_available", lambda: False)
    pos, batch = random_molecules([10, 10], seed=9)
    assert torch.equal(radius_graph(pos, 4.0, batch), radius_graph(pos, 4.0, batch, backend="torch"))


# --------------------------------------------------------------------------- periodic


def check_pbc_vs_ase(pos, cell, pbc, cutoff, expect_self_images=False):
    ei, off = radius_graph_pbc(pos, cutoff, None, cell, torch.tensor(pbc))
    assert ei.dtype == torch.long and off.dtype == pos.dtype and off.shape == (ei.shape[1], 3)
    ref = ase_set(pos, cutoff, cell=cell.numpy(), pbc=pbc)
    got = edge_set(ei, off)
    assert got == ref
    assert len(got) == ei.shape[1]
    assert_within_cutoff(pos, ei, cutoff, off, cell)
    assert_sorted_by_centre(ei)
    assert not any(i == j and s == (0, 0, 0) for i, j, s in got)
    for d in range(3):
        if not pbc[d]:
            assert bool((off[:, d] == 0).all())
    if expect_self_images:
        assert any(i == j for i, j, _ in got)
        # several images of the same neighbour
        pairs = [(i, j) for i, j, _ in got]
        assert len(set(pairs)) < len(pairs)
    return ei, off


def test_periodic_cubic_cell_vs_ase():
    rng = np.random.default_rng(10)
    cell = torch.eye(3, dtype=DT) * 9.0
    pos = torch.tensor(rng.random((60, 3)) * 9.0, dtype=DT)
    check_pbc_vs_ase(pos, cell, [True, True, True], 4.0)


def test_skewed_small_cell_vs_ase():
    rng = np.random.default_rng(11)
    cell = triclinic_cell()  # all heights < cutoff
    pos = torch.tensor(rng.random((5, 3)), dtype=DT) @ cell
    check_pbc_vs_ase(pos, cell, [True, True, True], 4.5, expect_self_images=True)
    # single atom: only self-images
    ei, off = check_pbc_vs_ase(pos[:1], cell, [True, True, True], 4.5, expect_self_images=True)
    assert bool((ei[0] == 0).all())


def test_positions_outside_cell_vs_ase():
    rng = np.random.default_rng(12)
    cell = triclinic_cell() * 2.0
    pos = torch.tensor(rng.normal(0, 6.0, (12, 3)), dtype=DT)  # not wrapped
    check_pbc_vs_ase(pos, cell, [True, True, True], 5.0, expect_self_images=True)


def test_mixed_pbc_vs_ase():
    rng = np.random.default_rng(13)
    cell = triclinic_cell() * 1.5
    pos = torch.tensor(rng.random((8, 3)), dtype=DT) @ cell
    pos[:, 2] += torch.tensor(rng.normal(0, 3.0, 8))  # slab sticking out in z
    check_pbc_vs_ase(pos, cell, [True, True, False], 4.0, expect_self_images=True)
    # slab with a zero third vector is fine for a non-periodic direction
    cell0 = cell.clone()
    cell0[2] = 0.0
    ei, off = radius_graph_pbc(pos, 4.0, None, cell0, torch.tensor([True, True, False]))
    ei_ref, off_ref = radius_graph_pbc(pos, 4.0, None, cell, torch.tensor([True, True, False]))
    assert torch.equal(ei, ei_ref) and torch.equal(off, off_ref)


def test_batched_periodic_and_nonperiodic_graphs():
    rng = np.random.default_rng(14)
    cells = torch.stack([triclinic_cell(), torch.eye(3, dtype=DT) * 7.0, triclinic_cell() * 1.7, torch.zeros(3, 3, dtype=DT)])
    pbcs = torch.tensor([[True] * 3, [True] * 3, [True, True, False], [False] * 3])
    sizes = [4, 30, 9, 21]
    pos = torch.cat([torch.tensor(rng.random((n, 3)), dtype=DT) @ (c if c.abs().sum() > 0 else torch.eye(3, dtype=DT) * 6) for n, c in zip(sizes, cells)])
    batch = torch.arange(4).repeat_interleave(torch.tensor(sizes))
    cutoff = 4.0
    ei, off = build_graph(pos, cutoff, batch, cells, pbcs)
    assert off is not None
    assert torch.equal(batch[ei[0]], batch[ei[1]])
    assert_sorted_by_centre(ei)
    assert_within_cutoff(pos, ei, cutoff, off, cells, batch)
    ptr = np.r_[0, np.cumsum(sizes)]
    ref = set()
    for g in range(4):
        p = pos[ptr[g] : ptr[g + 1]]
        if pbcs[g].any():
            ref |= ase_set(p, cutoff, cells[g].numpy(), pbcs[g].tolist(), start=ptr[g])
        else:
            ref |= {(i, j, (0, 0, 0)) for i, j in ase_set(p, cutoff, start=ptr[g])}
    assert edge_set(ei, off) == ref
    # float32 positions give the same graph here (no ties)
    ei32, off32 = build_graph(pos.float(), cutoff, batch, cells.float(), pbcs)
    assert off32.dtype == torch.float32
    assert edge_set(ei32, off32) == ref


def test_build_graph_dispatch():
    pos, batch = random_molecules([12, 9], seed=15)
    ei, off = build_graph(pos, 4.0, batch)
    assert off is None and torch.equal(ei, radius_graph(pos, 4.0, batch, backend="auto"))
    ei, off = build_graph(pos, 4.0, batch, cell=torch.eye(3, dtype=DT) * 3.0, pbc=torch.tensor([False] * 3))
    assert off is None and torch.equal(ei, radius_graph(pos, 4.0, batch))
    cell = torch.eye(3, dtype=DT) * 30.0
    ei2, off2 = build_graph(pos, 4.0, batch, cell=cell)  # pbc default: all True
    assert off2 is not None and bool((off2 == 0).all())
    assert torch.equal(ei2, ei)
    # one cell for a batch of graphs, pbc as (B, 3)
    ei3, off3 = build_graph(pos, 4.0, batch, cell=cell, pbc=torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(ei3, ei2) and torch.equal(off3, off2)


def test_pbc_empty_and_single_atom_in_big_cell():
    cell = torch.eye(3, dtype=DT) * 20.0
    ei, off = radius_graph_pbc(torch.zeros((0, 3), dtype=DT), 4.0, None, cell)
    assert ei.shape == (2, 0) and off.shape == (0, 3)
    ei, off = radius_graph_pbc(torch.ones((1, 3), dtype=DT), 4.0, None, cell)
    assert ei.shape == (2, 0) and off.shape == (0, 3)


# --------------------------------------------------------------------------- errors


def test_error_messages(monkeypatch):
    pos, batch = random_molecules([5, 5], seed=16)
    with pytest.raises(ValueError, match=r"pos must have shape \(N, 3\)"):
        radius_graph(pos[:, :2], 4.0)
    with pytest.raises(ValueError, match=r"pos must have shape \(N, 3\)"):
        radius_graph(pos.reshape(-1), 4.0)
    with pytest.raises(ValueError, match="batch must be sorted"):
        radius_graph(pos, 4.0, batch.flip(0))
    with pytest.raises(ValueError, match=r"batch must have shape"):
        radius_graph(pos, 4.0, batch[:-1])
    bad = pos.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"atom 2 of structure 1 \(atom 7 of the batch\) has a non-finite position"):
        radius_graph(bad, 4.0, batch)
    bad[7, 1] = float("inf")
    with pytest.raises(ValueError, match=r"\(atom 7 of the batch\) has a non-finite position \(NaN or inf\)"):
        radius_graph_pbc(bad, 4.0, batch, torch.eye(3, dtype=DT) * 10)
    with pytest.raises(ValueError, match="unknown neighbour-list backend 'cuda_magic'"):
        radius_graph(pos, 4.0, batch, backend="cuda_magic")
    with pytest.raises(ValueError, match="cutoff must be a positive"):
        radius_graph(pos, -1.0, batch)
    with pytest.raises(ValueError, match=r"cell must have shape \(3, 3\) or \(B, 3, 3\)"):
        radius_graph_pbc(pos, 4.0, batch, torch.eye(3, dtype=DT)[:2])
    with pytest.raises(ValueError, match="cell has 1 entries but batch has 2 graphs"):
        radius_graph_pbc(pos, 4.0, batch, torch.eye(3, dtype=DT).unsqueeze(0))
    with pytest.raises(ValueError, match="pbc must have shape"):
        radius_graph_pbc(pos, 4.0, batch, torch.eye(3, dtype=DT), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="zero lattice vector"):
        radius_graph_pbc(pos, 4.0, batch, torch.zeros(3, 3, dtype=DT))
    monkeypatch.setattr(nb, "torch_cluster_available", lambda: False)
    with pytest.raises(ValueError, match="torch_cluster is not installed.*pip install torch-cluster --no-build-isolation"):
        radius_graph(pos, 4.0, batch, backend="torch_cluster")


def test_edge_geometry_and_ensure_graph():
    """graph.edges: r_ij = x_j - x_i + n_ij·cell[batch[i]] for one cell (3, 3) and per-graph cells
    (B, 3, 3); ensure_graph passes a given list through, builds a missing one like build_graph, and
    checks periodic input first."""
    from pyg_equireann.graph.edges import edge_vectors, image_shifts
    from pyg_equireann.graph.edges import ensure_graph

    pos, batch = random_molecules([7, 9], seed=4, density=0.08)
    cells = torch.stack([torch.eye(3, dtype=DT) * 4.0, torch.eye(3, dtype=DT) * 4.5 + 0.2])
    ei, off = radius_graph_pbc(pos, 3.0, batch, cells)
    shift = image_shifts(ei, off, cells, batch)
    expected = torch.stack([off[e] @ cells[batch[ei[1, e]]] for e in range(ei.shape[1])])
    torch.testing.assert_close(shift, expected, rtol=0, atol=1e-12)
    lengths = torch.linalg.vector_norm(edge_vectors(pos, ei, shift), dim=-1)
    assert lengths.max() <= 3.0 and lengths.min() > 0
    first = batch[ei[1]] == 0
    torch.testing.assert_close(image_shifts(ei[:, first], off[first], cells[0]), shift[first], rtol=0, atol=1e-12)

    given = ensure_graph(pos, 3.0, batch, cells, None, ei, off)
    assert given[0] is ei and given[1] is off
    built = ensure_graph(pos, 3.0, batch, cells)
    assert torch.equal(built[0], ei) and torch.equal(built[1], off)
    mol = ensure_graph(pos, 3.0, batch)
    assert torch.equal(mol[0], radius_graph(pos, 3.0, batch)) and mol[1] is None
    with pytest.raises(ValueError, match="needs its cell_offsets"):
        ensure_graph(pos, 3.0, batch, cells, None, ei)
    with pytest.raises(ValueError, match="atoms/Å³"):
        ensure_graph(pos, 3.0, batch, cells * 0.05)
    # a skin widens the list, the density check stays at the cutoff
    wide, _ = ensure_graph(pos, 2.5, batch, cells, skin=0.5)
    assert torch.equal(wide, ei)


# --------------------------------------------------------------------------- vesin_torch backend


def test_vesin_torch_molecules_identical():
    """One vesin-torch call for a batch of molecules (sizes 1 and 2, skipped graph ids) gives the
    "torch" backend's edges exactly, in float64 and float32; 0 and 1 atoms give no edges."""
    pos, _ = random_molecules([21, 7, 1, 2, 33, 21, 15, 4, 60], seed=20)
    batch = torch.tensor(sum(([g] * n for g, n in zip([0, 1, 2, 3, 5, 6, 7, 8, 11], [21, 7, 1, 2, 33, 21, 15, 4, 60])), []))
    for cutoff in (4.0, 5.0):
        ref = radius_graph(pos, cutoff, batch, backend="torch")
        assert torch.equal(radius_graph(pos, cutoff, batch, backend="vesin_torch"), ref)
        e32 = radius_graph(pos.float(), cutoff, batch, backend="vesin_torch")
        assert torch.equal(e32, radius_graph(pos.float(), cutoff, batch, backend="torch"))
    assert torch.equal(radius_graph(pos, 4.0, None, backend="vesin_torch"), radius_graph(pos, 4.0, None, backend="vesin"))
    for n in (0, 1):
        ei = radius_graph(torch.zeros((n, 3), dtype=DT), 5.0, backend="vesin_torch")
        assert ei.shape == (2, 0) and ei.dtype == torch.long
    # the CPU default is unchanged: "auto" on CPU tensors is the "torch" backend
    assert torch.equal(radius_graph(pos, 4.0, batch), radius_graph(pos, 4.0, batch, backend="torch"))


def periodic_cases():
    rng = np.random.default_rng(21)
    tri = triclinic_cell()
    yield "tiny triclinic, self-images", torch.tensor(rng.random((5, 3)), dtype=DT) @ tri, None, tri, [True] * 3, 4.5
    yield "one atom, self-images only", torch.tensor(rng.random((1, 3)), dtype=DT) @ tri, None, tri, [True] * 3, 4.5
    yield "unwrapped, triclinic", torch.tensor(rng.normal(0, 6.0, (12, 3)), dtype=DT), None, tri * 2.0, [True] * 3, 5.0
    slab = torch.tensor(rng.random((8, 3)), dtype=DT) @ (tri * 1.5)
    slab[:, 2] += torch.tensor(rng.normal(0, 3.0, 8))
    yield "slab [T, T, F]", slab, None, tri * 1.5, [True, True, False], 4.0
    cell0 = tri * 1.5
    cell0[2] = 0.0
    yield "slab, zero non-periodic vector", slab, None, cell0, [True, True, False], 4.0
    cells = torch.stack([tri, torch.eye(3, dtype=DT) * 7.0, tri * 1.7, torch.zeros(3, 3, dtype=DT), tri * 1.2])
    pbcs = [[True] * 3, [True] * 3, [True, True, False], [False] * 3, [True, False, True]]
    sizes = [4, 30, 9, 21, 6]
    pos = torch.cat([torch.tensor(rng.random((n, 3)), dtype=DT) @ (c if c.abs().sum() > 0 else torch.eye(3, dtype=DT) * 6)
                     for n, c in zip(sizes, cells)])
    batch = torch.arange(5).repeat_interleave(torch.tensor(sizes))
    yield "batch of 5 cells, one non-periodic", pos, batch, cells, pbcs, 4.0


@pytest.mark.parametrize("case", list(periodic_cases()), ids=lambda c: c[0])
def test_vesin_torch_periodic_identical(case):
    """vesin-torch's periodic lists equal the CPU vesin path's (edges, order, integer offsets)."""
    _, pos, batch, cell, pbc, cutoff = case
    pbc = torch.tensor(pbc)
    for dtype in (DT, torch.float32):
        p, c = pos.to(dtype), cell.to(dtype)
        ei, off = radius_graph_pbc(p, cutoff, batch, c, pbc, backend="vesin_torch")
        ei_ref, off_ref = radius_graph_pbc(p, cutoff, batch, c, pbc, backend="vesin")
        assert ei.shape[1] > 0 and off.dtype == dtype
        assert torch.equal(ei, ei_ref) and torch.equal(off, off_ref)
    assert torch.equal(build_graph(pos, cutoff, batch, cell, pbc, backend="vesin_torch")[1], off_ref.to(DT))


def test_vesin_torch_periodic_empty_errors_and_missing(monkeypatch):
    cell = torch.eye(3, dtype=DT) * 20.0
    for n in (0, 1):
        ei, off = radius_graph_pbc(torch.ones((n, 3), dtype=DT), 4.0, None, cell, backend="vesin_torch")
        assert ei.shape == (2, 0) and off.shape == (0, 3)
    pos, batch = random_molecules([5, 5], seed=22)
    with pytest.raises(ValueError, match="cell of graph 0 has a zero lattice vector 0 in a periodic direction"):
        radius_graph_pbc(pos, 4.0, batch, torch.zeros(3, 3, dtype=DT), backend="vesin_torch")
    monkeypatch.setattr(nb, "vesin_torch_available", lambda: False)
    for fn in (lambda: radius_graph(pos, 4.0, batch, backend="vesin_torch"),
               lambda: build_graph(pos, 4.0, batch, cell, backend="vesin_torch")):
        with pytest.raises(ValueError, match=r"vesin-torch is not installed.*pip install \"pyg_equireann\[gpu\]\""):
            fn()


def test_vesin_torch_overflow_retry(monkeypatch):
    """A CUDA pair-buffer overflow is retried with a larger VESIN_CUDA_MAX_PAIRS_PER_POINT, which is
    restored afterwards (exercised here with a stand-in for the CUDA calculator)."""
    seen = []

    class Overflowing:
        def compute(self, points, box, periodic, quantities):
            cap = int(nb.os.environ.get("VESIN_CUDA_MAX_PAIRS_PER_POINT", "128"))
            seen.append(cap)
            if cap < 2000:
                raise RuntimeError("... Consider reducing the cutoff distance, or explicitly setting "
                                   "VESIN_CUDA_MAX_PAIRS_PER_POINT as an environment variable.")
            return [torch.zeros(0, dtype=torch.long)] * 2

    monkeypatch.delenv("VESIN_CUDA_MAX_PAIRS_PER_POINT", raising=False)
    monkeypatch.setattr(nb, "_vesin_torch_list", lambda cutoff: Overflowing())
    pos = torch.zeros((2, 3), dtype=DT)
    nb._vesin_torch_compute(4.0, 1e-5, pos, pos.new_zeros(3, 3), False, "ij")
    assert seen == [128, 512, 2048] and "VESIN_CUDA_MAX_PAIRS_PER_POINT" not in nb.os.environ
    monkeypatch.setattr(nb, "VESIN_TORCH_MAX_PAIRS_PER_POINT", 1000)
    with pytest.raises(RuntimeError, match="VESIN_CUDA_MAX_PAIRS_PER_POINT"):
        nb._vesin_torch_compute(4.0, 1e-5, pos, pos.new_zeros(3, 3), False, "ij")
    assert "VESIN_CUDA_MAX_PAIRS_PER_POINT" not in nb.os.environ


def test_vesin_torch_model_energy_forces_stress():
    """EquiREANN energy, forces and stress with model.neighbor_backend="vesin_torch" equal the default
    backend's (float64), for a batch of two periodic cells and for a batch of molecules."""
    from pyg_equireann import EquiREANN, energy_forces_stress

    from .conftest import make_model, small_periodic_system

    model = make_model(EquiREANN, cutoff=4.0, elements=(1, 6, 8), avg_num_neighbors=8.0)
    z1, p1, c1 = small_periodic_system(seed=0)
    z2, p2, c2 = small_periodic_system(seed=1)
    z, pos = torch.cat([z1, z2]), torch.cat([p1, p2])
    batch = torch.tensor([0] * 4 + [1] * 4)
    cell = torch.stack([c1, c2 * 1.1])
    pbc = torch.tensor([[True] * 3, [True, True, False]])
    mol_pos, mol_batch = random_molecules([6, 9, 7], seed=23, density=0.1)
    mol_z = torch.tensor([1, 6, 8])[torch.arange(22) % 3]
    results = {}
    for backend in ("auto", "vesin_torch"):
        model.neighbor_backend = backend
        results[backend] = (energy_forces_stress(model, z, pos, batch, cell, pbc, compute_stress=True),
                            energy_forces_stress(model, mol_z, mol_pos, mol_batch))
    for ref, got in zip(results["auto"], results["vesin_torch"]):
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10)


def test_reverse_edges_with_several_images_and_self_images():
    """reverse_edges pairs (j → i, S) with (i → j, −S), also where one pair has several periodic images and an atom
    sees its own images; an edge without its reverse (a one-way list) is reported as not found."""
    from pyg_equireann.graph import image_shifts, reverse_edges

    rng = np.random.default_rng(11)
    cell = triclinic_cell()  # all heights < cutoff
    pos = torch.tensor(rng.random((5, 3)), dtype=DT) @ cell
    ei, off = radius_graph_pbc(pos, 4.5, None, cell)
    shift = image_shifts(ei, off.to(DT), cell)
    perm = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(0))
    ei, shift = ei[:, perm], shift[perm]
    assert len(set(map(tuple, ei.T.tolist()))) < ei.shape[1]  # several images per pair
    reverse, found = reverse_edges(ei, 5, shift)
    assert bool(found.all())
    assert torch.equal(ei[0, reverse], ei[1]) and torch.equal(ei[1, reverse], ei[0])
    assert torch.equal(shift[reverse], -shift)
    assert torch.equal(reverse[reverse], torch.arange(ei.shape[1]))
    assert not torch.equal(shift[reverse_edges(ei, 5)[0]], -shift)  # without the shifts the images are mixed up
    mol = radius_graph(pos.float() * 3.0, 4.0)
    _, found = reverse_edges(mol[:, 1:], 5)  # one edge dropped: its reverse has no partner
    assert not bool(found.all())
