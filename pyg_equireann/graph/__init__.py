"""Graphs and their geometry: neighbour lists (molecules and periodic cells), edge vectors and image
shifts, input checks, and forces/stress by automatic differentiation."""
from pyg_equireann.graph.edges import edge_vectors, ensure_graph, image_shifts, reverse_edges
from pyg_equireann.graph.forces import energy_forces_stress
from pyg_equireann.graph.neighbors import build_graph, radius_graph, radius_graph_pbc

__all__ = ["build_graph", "ensure_graph", "radius_graph", "radius_graph_pbc", "edge_vectors", "image_shifts",
           "reverse_edges", "energy_forces_stress"]
