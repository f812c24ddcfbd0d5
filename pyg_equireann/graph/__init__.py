"""Graphs and their geometry: neighbour lists (molecules and periodic cells), input checks, and
forces/stress by automatic differentiation."""
from pyg_equireann.graph.forces import energy_forces_stress
from pyg_equireann.graph.neighbors import build_graph, radius_graph, radius_graph_pbc

__all__ = ["build_graph", "radius_graph", "radius_graph_pbc", "energy_forces_stress"]
