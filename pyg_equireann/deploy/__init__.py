"""Deployment: the exported (TorchScript) potential and the ASE calculator."""
