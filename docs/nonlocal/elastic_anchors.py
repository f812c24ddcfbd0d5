"""The learned anchor stiffness of a trained elastic model along a straight n = 16 cumulene (end hydrogens, end
carbons and the middle eight carbons), per channel (and degree, with ``elastic_anchor_per_degree``), and the spring
stiffness s = softplus(θ), and the readout weight of each elastic energy: the diagnostic of "The anchor floor" and
"Terminal anchors" in docs/nonlocal.md.

    python docs/nonlocal/elastic_anchors.py <equireann-nonlocal run folder> [...]
"""
import glob
import sys

import torch

from pyg_equireann.experiments.cumulene_xtb import build_chain
from pyg_equireann.training.evaluation import load_checkpoint


def main(runs):
    for run in runs:
        (ckpt,) = glob.glob(f"{run}/equireann_elastic/checkpoints/best.ckpt")
        model = load_checkpoint(ckpt, float64=True).model
        inner = model
        while not hasattr(inner, "elastic"):  # the reference-energy wrapper
            inner = inner.model
        elastic = inner.elastic
        seen = {}
        # the relaxation's inputs: (orbitals, density, bond_index, bond_weight, batch, num_graphs[, terminal])
        hook = elastic.register_forward_hook(lambda module, inputs, out: seen.__setitem__("inputs", inputs))
        atoms = build_chain(16)
        z = torch.tensor(atoms.numbers)
        with torch.no_grad():
            model(z, torch.tensor(atoms.positions))
            inputs = seen["inputs"]
            # (N, K) or (N, L+1, K); with elastic_terminal_anchor the fixed a_t·τ included
            every = elastic.anchor_stiffness(inputs[1], inputs[6] if len(inputs) > 6 else None)
        anchor, hydrogen = every[z == 6], every[z == 1][0]  # the 16 carbons (chain order), one end hydrogen
        hook.remove()
        # readout weight of each elastic energy over its RMS on the first training structures, (L+1, K)
        readout = (inner.elastic_weight / inner.elastic_scale).detach().view(-1, elastic.num_channels)
        print(f"{run}: floor {elastic.min_anchor:g}, terminal anchor {elastic.terminal_anchor}, readout weight / RMS "
              f"(rows l, columns channels) {[[float(f'{x:.3g}') for x in row] for row in readout]}, springs s = "
              f"{[round(float(s), 3) for s in torch.nn.functional.softplus(elastic.stiffness.detach())]}")
        per_degree = anchor.dim() == 3  # elastic_anchor_per_degree: (16, L+1, K)
        for k in range(anchor.shape[-1]):
            for l in range(anchor.shape[1] if per_degree else 1):
                column = anchor[:, l, k] if per_degree else anchor[:, k]
                h = hydrogen[l, k] if per_degree else hydrogen[k]
                middle = column[4:12]
                print(f"  channel {k} (sigma {int(elastic.sign[k]):+d})" + (f", l = {l}" if per_degree else "")
                      + f": end hydrogens {float(h):.3g}, end carbons {float(column[0]):.3g}, "
                      f"middle {float(middle.min()):.3g}-{float(middle.max()):.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
