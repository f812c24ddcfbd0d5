"""Kept for ``from pyg_equireann.ase import EquiREANNCalculator``; the calculator lives in
:mod:`pyg_equireann.deploy.ase`."""
from pyg_equireann.deploy.ase import EquiREANNCalculator, load_potential

__all__ = ["EquiREANNCalculator", "load_potential"]
