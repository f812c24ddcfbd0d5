"""``equireann-export``: turn a training checkpoint into a ``.pt2`` package that needs only torch
(:func:`pyg_equireann.deploy.export.export`; interface in ``docs/deployment.md``)."""
from pathlib import Path
from typing import Dict

from omegaconf import DictConfig

from pyg_equireann.cli import check_writable, hydra_entry, user_errors


def run(cfg: DictConfig) -> Dict[str, float]:
    check_writable(Path(str(cfg.out)).expanduser().parent, "export folder")
    from pyg_equireann.deploy.export import export  # torch: after the check

    deviations = export(cfg.ckpt_path, cfg.out, cfg.dtype, cfg.check, bool(cfg.aoti), str(cfg.device))
    print(f"exported {cfg.ckpt_path} -> {cfg.out} ({cfg.dtype}{', AOTInductor' if cfg.aoti else ''})")
    if deviations:
        print("largest relative deviation from the checkpoint: "
              + ", ".join(f"{k} {v:.1e}" for k, v in deviations.items()))
    return deviations


@hydra_entry("export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
