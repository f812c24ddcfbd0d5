"""Export of a training checkpoint as a TorchScript model that needs only torch.

The file holds a :class:`~pyg_equireann.deploy.torchscript.DeployedPotential` (EMA weights of the checkpoint)
and a ``metadata.json`` (cutoff, elements, dtype, model config, interface version); inputs and
outputs are described in ``docs/deployment.md``.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pyg_equireann.utils import resolve_dtype


def check_structures(elements, seed: int = 0) -> List[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Two test structures ``(z, pos, cell)`` of the model's elements: a 12-atom cluster and a periodic 16-atom
    cell (atoms on a jittered grid, 1.3 Å apart, so no pair is unphysically close); float64 positions in Å."""
    gen = torch.Generator().manual_seed(seed)
    elements = torch.tensor(list(elements)[:8], dtype=torch.long)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).view(-1, 3)
    structures = []
    for n, cell in ((12, None), (16, torch.tensor([[4.1, 0.0, 0.0], [0.3, 3.9, 0.0], [0.2, -0.4, 4.3]]))):
        pos = (grid[:n] * 1.3 + 0.15 * torch.randn(n, 3, generator=gen)).double()
        z = elements[torch.randint(len(elements), (n,), generator=gen)]
        structures.append((z, pos, None if cell is None else cell.double()))
    return structures


def compare(model, exported, elements) -> Dict[str, float]:
    """Largest relative deviation of energy, forces (and stress) of ``exported`` from ``model``."""
    from pyg_equireann.graph.forces import energy_forces_stress

    dtype = exported.center_weight_table.dtype
    out = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for z, pos, cell in check_structures(elements):
        pos = pos.to(dtype)
        ref = {k: v.detach() for k, v in energy_forces_stress(model, z, pos, cell=cell, compute_stress=cell is not None).items()}
        got = exported.predict(pos, z, cell, None, cell is not None)
        out["energy"] = max(out["energy"], float(((got["energy"] - ref["energy"]).abs() / ref["energy"].abs()).max()))
        scale = float(ref["forces"].abs().max()) or 1.0
        out["forces"] = max(out["forces"], float((got["forces"] - ref["forces"]).abs().max()) / scale)
        if cell is not None:
            stress = -got["virial"] / torch.linalg.det(cell).abs()
            scale = float(ref["stress"].abs().max()) or 1.0
            out["stress"] = max(out["stress"], float((stress - ref["stress"]).abs().max()) / scale)
    return out


def export(ckpt_path: str, out: str, dtype: str = "float64", check: bool = True) -> Dict[str, float]:
    """Export the checkpoint's model to ``out``; returns the deviations of :func:`compare` (if checked)."""
    from pyg_equireann import __version__
    from pyg_equireann.deploy.torchscript import INTERFACE_VERSION, DeployedPotential
    from pyg_equireann.training.evaluation import load_checkpoint

    torch_dtype = resolve_dtype(str(dtype))
    module = load_checkpoint(ckpt_path, float64=None)
    model = module.model.to(torch_dtype).eval()
    scripted = torch.jit.script(DeployedPotential(model))
    metadata = {
        "interface_version": INTERFACE_VERSION,
        "model": type(model).__name__,
        "cutoff": float(model.cutoff),
        "elements": list(scripted.elements),
        "dtype": dtype,
        "model_config": module.hparams.get("model_config"),
        "checkpoint": str(Path(ckpt_path).expanduser().resolve()),
        "pyg_equireann_version": __version__,
        "torch_version": torch.__version__,
    }
    out_path = Path(out).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(out_path), _extra_files={"metadata.json": json.dumps(metadata, indent=2)})
    deviations = {}
    if check:
        deviations = compare(model, torch.jit.load(str(out_path)), metadata["elements"])
        tolerance = 1e-6 if dtype == "float64" else 1e-3
        worst = max(deviations.values())
        if worst > tolerance:
            raise ValueError(f"exported model deviates from the checkpoint by {worst:.2e} (relative) > {tolerance}: "
                             f"{deviations}")
    return deviations


def read_metadata(path: str) -> dict:
    """The ``metadata.json`` of an exported model (plain torch: ``torch.jit.load(path, _extra_files=...)``)."""
    extra = {"metadata.json": ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["metadata.json"])
