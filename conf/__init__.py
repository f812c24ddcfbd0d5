"""Hydra configs shipped with pyg_equireann (installed from the top-level conf/ folder)."""
