"""The learned anchor stiffness of a trained elastic model along a straight n = 16 cumulene (end carbons and the
middle eight), per channel, and the spring stiffness s = softplus(θ): the diagnostic of "The anchor floor" in
docs/nonlocal.md.

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
        hook = elastic.anchor.register_forward_hook(lambda module, inputs, out: seen.__setitem__("density", inputs[0]))
        atoms = build_chain(16)
        z = torch.tensor(atoms.numbers)
        with torch.no_grad():
            model(z, torch.tensor(atoms.positions))
            anchor = elastic.anchor_stiffness(seen["density"])[z == 6]  # (16, K)
        hook.remove()
        print(f"{run}: floor {elastic.min_anchor:g}, springs s = "
              f"{[round(float(s), 3) for s in torch.nn.functional.softplus(elastic.stiffness.detach())]}")
        for k in range(anchor.shape[-1]):
            middle = anchor[4:12, k]
            print(f"  channel {k} (sigma {int(elastic.sign[k]):+d}): end carbons {float(anchor[0, k]):.3g}, "
                  f"middle {float(middle.min()):.3g}-{float(middle.max()):.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
