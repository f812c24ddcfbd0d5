"""Dataset statistics that set a model's energy reference, scale and neighbour normalisation."""
import math
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyg_equireann.nn.elements import MAX_Z
from pyg_equireann.graph.edges import ensure_graph


def compute_statistics(
    data_list: Iterable,
    cutoff: float,
    energy_key: str = "energy",
    forces_key: Optional[str] = "forces",
    atomic_energies: Optional[Dict[int, float]] = None,
    precomputed_edges: bool = False,
) -> Dict[str, object]:
    """Per-element reference energies, energy scale and shift, and average neighbour count.

    Args:
        data_list: graphs with ``z`` (N,), ``pos`` (N, 3) Å, an energy (eV) under ``energy_key``,
            optionally forces (N, 3) eV/Å under ``forces_key`` and ``cell`` (3, 3) / ``pbc`` (3,).
        cutoff: neighbour cutoff (Å) for the average neighbour count.
        atomic_energies: known isolated-atom energies {Z: eV}; fitted by least squares when None.
        precomputed_edges: count neighbours from each structure's ``edge_index`` (built with this
            ``cutoff``, as the data modules do) instead of building the neighbour list again.

    Returns:
        dict with ``atomic_energies`` {Z: eV}, ``shift`` (mean per-atom residual energy, eV),
        ``scale`` (RMS force component, eV/Å, or the per-atom residual energy std without forces)
        and ``avg_num_neighbors`` — the keyword arguments of
        :meth:`~pyg_equireann.EquiREANN.set_energy_statistics` (other models take the first three).
    """
    counts, energies, num_atoms, forces_sq, num_force, num_edges = [], [], [], 0.0, 0, 0
    for index, data in enumerate(data_list):
        z = data.z.long()
        energy = getattr(data, energy_key, None)
        if energy is None:
            raise KeyError(f"structure {index} has no energy under key {energy_key!r}")
        counts.append(torch.bincount(z, minlength=MAX_Z + 1).double())
        energies.append(float(energy))
        num_atoms.append(len(z))
        if forces_key is not None and getattr(data, forces_key, None) is not None:
            f = getattr(data, forces_key).double()
            forces_sq += float(f.square().sum())
            num_force += f.numel()
        edge_index = getattr(data, "edge_index", None) if precomputed_edges else None
        if edge_index is None:
            edge_index, _ = ensure_graph(data.pos, cutoff, None, getattr(data, "cell", None), getattr(data, "pbc", None))
        num_edges += edge_index.shape[1]
    if not energies:
        raise ValueError("compute_statistics got no structures")
    A = torch.stack(counts)
    y = torch.tensor(energies, dtype=torch.float64)
    n = torch.tensor(num_atoms, dtype=torch.float64)
    present = (A.sum(0) > 0).nonzero().flatten()
    e0 = torch.zeros(MAX_Z + 1, dtype=torch.float64)
    if atomic_energies is None:
        solution = torch.linalg.lstsq(A[:, present], y.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        e0[present] = solution
    else:
        missing = [int(zz) for zz in present if int(zz) not in atomic_energies]
        if missing:
            raise KeyError(f"atomic_energies has no entry for elements {missing}")
        for zz, value in atomic_energies.items():
            e0[int(zz)] = float(value)
    residual_per_atom = (y - A @ e0) / n
    shift = float(residual_per_atom.mean())
    if num_force:
        scale = (forces_sq / num_force) ** 0.5
    else:
        scale = float(residual_per_atom.std()) if len(energies) > 1 else 1.0
    return {
        "atomic_energies": {int(zz): float(e0[zz]) for zz in present},
        "shift": shift,
        "scale": scale if scale > 0 else 1.0,
        "avg_num_neighbors": num_edges / float(n.sum()),
    }


#: Largest plausible |E - Σ E0| per atom (eV/atom); cohesive and atomisation energies are below ~10.
MAX_BINDING_PER_ATOM = 20.0
#: Smallest plausible energy-fluctuation length (Å), see :func:`check_energy_units`; below
#: :data:`MIN_ENERGY_FORCE_LENGTH_ERROR` with >= 10 frames beyond the per-element fit it is an error.
MIN_ENERGY_FORCE_LENGTH = 0.005
MIN_ENERGY_FORCE_LENGTH_ERROR = 0.002
#: The same limit with only 4-9 such frames (the length is then known to a factor ~2-4).
MIN_ENERGY_FORCE_LENGTH_FEW = 0.0025
#: Largest plausible energy-fluctuation length (Å) (relaxed scans reach ~0.5 Å).
MAX_ENERGY_FORCE_LENGTH = 2.0
#: Frame pairs whose atoms moved at most this far (Å, after superposition) test ΔE = work of the forces,
#: if the work is not a near-cancellation: |W| at least this fraction of Σ_atoms |F̄_a| |Δx_a|.
MAX_PAIR_DISPLACEMENT = 0.5
MIN_PAIR_WORK_FRACTION = 0.05
#: |log10(ΔE / work)| (median over informative pairs) from which units are called inconsistent (factor
#: 10): an error with at least :data:`MIN_PAIRS_ERROR` pairs (too large ΔE) or :data:`MIN_PAIRS_ERROR_LOW`
#: (too small ΔE, which also comes from pairs of similar energies), else a warning (too small ΔE: from
#: :data:`MIN_PAIRS_ERROR` pairs on). Below :data:`PAIR_LOG_RATIO_CONSISTENT` with :data:`MIN_PAIRS_ERROR`
#: pairs the units are consistent.
PAIR_LOG_RATIO_LIMIT = 1.0
PAIR_LOG_RATIO_CONSISTENT = 0.7
MIN_PAIRS_ERROR = 3
MIN_PAIRS_ERROR_LOW = 5
#: Unit mix-ups and the ratio ΔE / work they produce (energies as stored vs forces as stored).
KNOWN_RATIOS = {
    "energies in Hartree with forces in eV/Å": 1 / 27.211386,
    "energies in kcal/mol with forces in eV/Å": 23.060548,
    "energies in eV with forces in kcal/mol/Å": 1 / 23.060548,
    "energies in kJ/mol with forces in eV/Å": 96.485332,
    "energies in meV with forces in eV/Å": 1000.0,
    "energies in eV with forces in Hartree/Bohr": 51.422067,
    "energies in Hartree with forces in Hartree/Bohr (positions in Å)": 1.8897261,
}

UNITS_HINT = ("Convert the energies to eV and the forces to eV/Å (1 Hartree = 27.211 eV, 1 kcal/mol = 0.04336 eV, "
              "1 Hartree/Bohr = 51.42 eV/Å)")


def pair_log_ratio(pairs: Tensor) -> Tuple[int, float]:
    """(number of informative pairs, median log10 |ΔE / W| over them) of :func:`frame_pair_work` rows:
    pairs within :data:`MAX_PAIR_DISPLACEMENT` whose work is no near-cancellation."""
    keep = ((pairs[:, 2] <= MAX_PAIR_DISPLACEMENT) & (pairs[:, 1].abs() >= MIN_PAIR_WORK_FRACTION * pairs[:, 3])
            & (pairs[:, 1] != 0) & (pairs[:, 0] != 0))
    if not bool(keep.any()):
        return 0, float("nan")
    return int(keep.sum()), float((pairs[keep, 0] / pairs[keep, 1]).abs().log10().median())


class UnitIssue(NamedTuple):
    """A unit problem found by :func:`check_energy_units`; ``error``: unambiguous (training should stop)."""

    message: str
    error: bool


def _closest_mixup(ratio: float) -> str:
    name, value = min(KNOWN_RATIOS.items(), key=lambda item: abs(math.log(ratio / item[1])))
    return f"; {name} give {value:.3g}" if abs(math.log10(ratio / value)) < 0.3 else ""


def check_energy_units(
    energies: Tensor,
    counts: Tensor,
    atomic_energies: Dict[int, float],
    forces_rms: Optional[float] = None,
    atomic_energies_given: bool = False,
    source: str = "",
    frames: Optional[Sequence[int]] = None,
    pairs: Optional[Tensor] = None,
) -> List[UnitIssue]:
    """Energies whose scale is implausible in eV, or inconsistent with the forces (Hartree or kcal/mol
    energies with eV/Å forces, ...).

    Three tests, all blind to a data set that is consistently in another unit:

    * with isolated-atom energies ``atomic_energies_given``: :math:`|E - \\sum_i E^0_{Z_i}|/N` above
      :data:`MAX_BINDING_PER_ATOM` in some frame (energies and E0 in different units or methods): warning;
    * with forces and frame ``pairs`` (:func:`frame_pair_work`): the median :math:`r` of
      :math:`\\log_{10}|\\Delta E / W|` over the informative pairs (:func:`pair_log_ratio`) is ~0 in consistent
      units (:math:`10^r` = 0.94-1.03 on the shipped sets), -1.43 for Hartree and +1.36 for kcal/mol energies
      with eV/Å forces. :math:`|r| \\ge` :data:`PAIR_LOG_RATIO_LIMIT`: an error with enough pairs
      (:data:`MIN_PAIRS_ERROR`, :data:`MIN_PAIRS_ERROR_LOW`), else a warning. At least 3 pairs with
      :math:`|r| <` :data:`PAIR_LOG_RATIO_CONSISTENT` skip the next test;
    * with forces: the length :math:`\\ell = \\sqrt{\\langle \\delta E^2/(3N) \\rangle}/F_\\mathrm{rms}`, where
      :math:`\\delta E` are the energies minus the fitted per-element part. :math:`\\ell` is about the thermal
      displacement: 0.019-0.030 Å on rMD17 and acac, 0.1-0.45 Å on cumulene, 0.2 Å on cu_emt; 27x smaller
      for Hartree energies with eV/Å forces, 23x larger for kcal/mol energies. Below
      :data:`MIN_ENERGY_FORCE_LENGTH` (with >= 10 frames more than the per-element fit has parameters;
      4-9: :data:`MIN_ENERGY_FORCE_LENGTH_FEW`) a warning, below :data:`MIN_ENERGY_FORCE_LENGTH_ERROR`
      (>= 10) an error; above :data:`MAX_ENERGY_FORCE_LENGTH` (>= 10) a warning (relaxed structures also
      give a large :math:`\\ell`).

    Args:
        energies: (F,) energies (eV). counts: (F, 119) atoms of each element per frame.
        atomic_energies: {Z: eV} used as reference (fitted or given).
        forces_rms: RMS force component (eV/Å), None without forces.
        source, frames: file and frame numbers for the messages.
        pairs: (P, 4) rows from :func:`frame_pair_work`.
    """
    energies = energies.double()
    counts = counts.double()
    n = counts.sum(1)
    e0 = torch.zeros(counts.shape[1], dtype=torch.float64)
    for z, value in atomic_energies.items():
        e0[int(z)] = float(value)
    residual = energies - counts @ e0
    issues: List[UnitIssue] = []
    hint = ("Are the energies in eV (1 Hartree = 27.211 eV, 1 kcal/mol = 0.04336 eV) and the forces in eV/Å "
            "(1 Hartree/Bohr = 51.42 eV/Å)?")
    where = f"{source}: " if source else ""
    if atomic_energies_given and len(energies):
        per_atom = residual / n
        k = int(per_atom.abs().argmax())
        if abs(float(per_atom[k])) > MAX_BINDING_PER_ATOM:
            frame = int(frames[k]) if frames is not None else k
            issues.append(UnitIssue(
                f"{where}frame {frame}: the energy minus the isolated-atom energies is {float(per_atom[k]):.4g} "
                f"eV/atom; binding energies are a few eV/atom. {hint} Are the isolated-atom energies from the "
                "same method and code as the data?", False))
    if forces_rms is None or not forces_rms > 0:
        return issues
    m, log_ratio = pair_log_ratio(pairs) if pairs is not None and len(pairs) else (0, float("nan"))
    if m and abs(log_ratio) >= PAIR_LOG_RATIO_LIMIT and (log_ratio > 0 or m >= MIN_PAIRS_ERROR):
        ratio = 10.0 ** log_ratio
        error = m >= (MIN_PAIRS_ERROR if log_ratio > 0 else MIN_PAIRS_ERROR_LOW)
        issues.append(UnitIssue(
            f"{where}energies and forces have inconsistent units: between {m} pairs of nearby frames of one "
            f"structure the energy changes are {ratio:.3g} times the work of the forces (median |ΔE/W|; 1 in "
            f"consistent units{_closest_mixup(ratio)}). {UNITS_HINT}", error))
        return issues
    consistent = m >= MIN_PAIRS_ERROR and abs(log_ratio) < PAIR_LOG_RATIO_CONSISTENT
    present = counts.sum(0) > 0
    dof = len(energies) - int(torch.linalg.matrix_rank(counts[:, present]))
    if dof >= 4 and not consistent:
        fit = torch.linalg.lstsq(counts[:, present], residual.unsqueeze(-1), driver="gelsd").solution
        fluctuation = residual - (counts[:, present] @ fit).squeeze(-1)
        length = float((fluctuation.square() / (3 * n)).mean().sqrt()) / forces_rms
        low = MIN_ENERGY_FORCE_LENGTH if dof >= 10 else MIN_ENERGY_FORCE_LENGTH_FEW
        if length < low:
            issues.append(UnitIssue(
                f"{where}energies vary little for the size of the forces (energy fluctuation / force = "
                f"{length:.2g} Å over {len(energies)} frames; thermal data give ~0.02-0.5 Å, Hartree "
                f"energies with eV/Å forces 27x less): energies and forces look like different units. {UNITS_HINT}",
                dof >= 10 and length < MIN_ENERGY_FORCE_LENGTH_ERROR))
        elif dof >= 10 and length > MAX_ENERGY_FORCE_LENGTH:
            issues.append(UnitIssue(
                f"{where}energies vary much for the size of the forces (energy fluctuation / force = {length:.2g} Å; "
                "thermal data give ~0.02-0.5 Å, kcal/mol energies with eV/Å forces 23x more): energies and forces "
                f"may be in different units, unless the frames are relaxed structures. {UNITS_HINT}", False))
    return issues


def _kabsch(reference: Tensor, moving: Tensor) -> Tensor:
    """(3, 3) rotation R that best maps the centred ``moving`` (N, 3) onto the centred ``reference``
    (``moving_c @ R ≈ reference_c``)."""
    a = reference - reference.mean(0)
    b = moving - moving.mean(0)
    u, _, vt = torch.linalg.svd(b.T @ a)
    d = torch.sign(torch.linalg.det(u @ vt))
    u = torch.cat([u[:, :2], u[:, 2:] * d], dim=1)
    return u @ vt


def _displacement(x1: Tensor, x2: Tensor, f2: Tensor, cell: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Displacement x2 - x1 (N, 3) and forces of frame 2 in frame 1's orientation: molecules (``cell``
    None) are superposed (rotation and translation do not change E), periodic frames of one cell use
    the minimum-image displacement of each atom."""
    if cell is None:
        rotation = _kabsch(x1, x2)
        return (x2 - x2.mean(0)) @ rotation + x1.mean(0) - x1, f2 @ rotation
    frac = torch.linalg.solve(cell.T, (x2 - x1).T).T
    return (frac - torch.round(frac)) @ cell, f2


def frame_pair_work(
    numbers: Sequence[Tensor],
    positions: Sequence[Tensor],
    forces: Sequence[Tensor],
    energies: Tensor,
    cells: Optional[Sequence[Optional[Tensor]]] = None,
    max_frames: int = 1000,
    neighbors: int = 3,
) -> Tensor:
    """Energy differences and the work of the forces between nearest frames of one molecule or cell.

    Frames with the same atoms in the same order (and, if periodic, the same cell) are grouped; each
    frame is paired with its ``neighbors`` nearest frames of the group (RMS displacement after
    superposition). For a
    pair, :math:`\\Delta E = E_2 - E_1` and :math:`W = -\\tfrac12 (F_1 + F_2) \\cdot (x_2 - x_1)`
    (trapezoid rule, exact for a quadratic energy) agree when energies and forces have consistent units:
    :math:`\\Delta E / W` is 1/27.2 for energies in Hartree with forces in eV/Å, 23.1 for kcal/mol with eV/Å.

    Args:
        numbers, positions (Å), forces (eV/Å): per frame, (N,), (N, 3), (N, 3).
        energies: (F,) eV. cells: per frame (3, 3) Å for periodic frames, else None.
        max_frames: at most this many frames of each group are used (the first ones).

    Returns:
        (P, 4) float64 rows ``(ΔE, W, largest atom displacement, Σ_a |F̄_a| |Δx_a|)`` of the distinct pairs
        (eV, eV, Å, eV; F̄ the mean force of the pair; the last bounds |W|).
    """
    groups: Dict[tuple, List[int]] = {}
    for k, z in enumerate(numbers):
        cell = None if cells is None else cells[k]
        key = (tuple(z.tolist()), None if cell is None else tuple(torch.round(cell.double().flatten() * 1e6).tolist()))
        groups.setdefault(key, []).append(k)
    rows: List[Tuple[float, float, float]] = []
    for (_, cell_key), members in groups.items():
        members = members[:max_frames]
        if len(members) < 2:
            continue
        cell = None if cell_key is None else cells[members[0]].double().reshape(3, 3)
        ref = positions[members[0]].double()
        # nearest neighbours among all frames brought close to the first one
        aligned = torch.stack([
            ref + _displacement(ref, positions[k].double(), forces[k].double(), cell)[0] for k in members
        ]).flatten(1)
        dist = torch.cdist(aligned, aligned)
        dist.fill_diagonal_(float("inf"))
        nearest = dist.topk(min(neighbors, len(members) - 1), dim=1, largest=False).indices
        seen = set()
        for a, b in ((a, b) for a, row in enumerate(nearest.tolist()) for b in row):
            pair = (min(a, b), max(a, b))
            if pair in seen:
                continue
            seen.add(pair)
            i, j = members[pair[0]], members[pair[1]]
            x1, f1 = positions[i].double(), forces[i].double()
            dx, f2 = _displacement(x1, positions[j].double(), forces[j].double(), cell)
            mean_force = 0.5 * (f1 + f2)
            work = -float((mean_force * dx).sum())
            step = dx.square().sum(1).sqrt()
            bound = float((mean_force.square().sum(1).sqrt() * step).sum())
            rows.append((float(energies[j]) - float(energies[i]), work, float(step.max()), bound))
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
