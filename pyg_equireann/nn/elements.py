"""Element bookkeeping shared by the models."""
from typing import Optional, Sequence, Tuple

import torch
from ase.data import chemical_symbols
from torch import Tensor

MAX_Z = 118


def symbol(z: int) -> str:
    return chemical_symbols[z] if 0 <= z <= MAX_Z else f"Z={z}"


def check_atomic_numbers(z: Tensor, allowed: Optional[Tensor] = None) -> None:
    """Raise a ValueError naming the first atom whose atomic number is invalid or not in ``allowed``
    (a (MAX_Z+1,) bool mask)."""
    bad = (z < 1) | (z > MAX_Z)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"atom {i} has atomic number {int(z[i])}; expected 1..{MAX_Z}")
    if allowed is not None:
        unknown = ~allowed[z]
        if bool(unknown.any()):
            i = int(unknown.nonzero()[0])
            known = [symbol(int(e)) for e in allowed.nonzero().flatten()]
            raise ValueError(
                f"atom {i} is element {symbol(int(z[i]))} (Z={int(z[i])}), which this model was not built for; "
                f"model elements: {known}"
            )


def element_mask(elements: Optional[Sequence[int]]) -> Tensor:
    """(MAX_Z+1,) bool mask of the allowed atomic numbers (all when ``elements`` is None)."""
    mask = torch.zeros(MAX_Z + 1, dtype=torch.bool)
    if elements is None:
        mask[1:] = True
    else:
        for e in elements:
            if not 1 <= int(e) <= MAX_Z:
                raise ValueError(f"invalid atomic number {e} in elements")
            mask[int(e)] = True
    return mask


def element_slots(elements: Optional[Sequence[int]]) -> Tensor:
    """(MAX_Z+1,) long: the index of each atomic number in ``elements`` (-1 if absent; all -1 when None)."""
    slots = torch.full((MAX_Z + 1,), -1, dtype=torch.long)
    if elements is not None:
        slots[torch.as_tensor(list(elements), dtype=torch.long)] = torch.arange(len(elements))
    return slots


def species_table(elements: Optional[Sequence[int]]) -> Tuple[Tensor, Tensor]:
    """The species a model computes its per-element tables for, ``(species (S,), slot (MAX_Z+1,))``: its
    ``elements`` (every atomic number 1..MAX_Z when None) and the index of each atomic number among them
    (-1 if absent). Atom i's species is then ``slot[z_i]``: no data-dependent shapes, no host sync."""
    species = torch.arange(1, MAX_Z + 1) if elements is None else torch.as_tensor(sorted(elements), dtype=torch.long)
    slot = torch.full((MAX_Z + 1,), -1, dtype=torch.long)
    slot[species] = torch.arange(species.numel())
    return species, slot


def invalid_atomic_numbers(z: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
    """() bool tensor: does ``z`` hold an invalid atomic number or one outside ``allowed`` (no host sync)."""
    bad = (z < 1) | (z > MAX_Z)
    if allowed is not None:
        bad = bad | ~allowed[z.clamp(0, MAX_Z)]
    return bad.any()
