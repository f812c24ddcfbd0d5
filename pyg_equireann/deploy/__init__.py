"""Deployment: export to a ``.pt2`` package (:mod:`~pyg_equireann.deploy.export`), the exported-model wrapper
(:mod:`~pyg_equireann.deploy.package`) and the ASE calculator (:mod:`~pyg_equireann.deploy.ase`)."""
