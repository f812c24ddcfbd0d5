"""``equireann-nonlocal``: the cumulene twist benchmark (configured by ``conf/nonlocal.yaml``).

  equireann-nonlocal                                   # full experiment (6 models × 10 CPU-min)
  equireann-nonlocal nonlocal=quick                    # quick variant (6 models × 1 CPU-min, < 10 min)
  equireann-nonlocal run=[mace] hydra.run.dir=<run>    # add a model to a finished run, rewrite the report
  equireann-nonlocal run=[] hydra.run.dir=<run>        # only rewrite the report

Trains every model with the same cutoff, data, loss, optimiser and CPU-time budget and writes one
subfolder per model and ``report.md``, ``per_length.csv``, ``twist_curves.csv``, ``twist_curves.png`` and
``rigid_twist.png`` into the run folder (``runs/nonlocal/<time>/``); see
:mod:`pyg_equireann.experiments.nonlocal_suite`.
"""
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pyg_equireann.cli import hydra_entry, user_errors


def run(cfg: DictConfig) -> Path:
    from pyg_equireann.experiments.nonlocal_suite import run_nonlocal  # torch, Lightning: after Hydra's checks

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    report = run_nonlocal(cfg, run_dir)
    print(report.read_text())
    print(f"run folder: {run_dir}")
    return report


@hydra_entry("nonlocal")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
