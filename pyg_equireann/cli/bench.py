"""``equireann-bench``: compare EquiREANN with other GNN potentials (Hydra app, ``conf/bench.yaml``).

  equireann-bench                                   # speed: aspirin ×32 and water boxes, all models
  equireann-bench bench=aspirin                     # speed: aspirin ×32, EquiREANN variants, REANN, SchNet
  equireann-bench bench=train_step                  # ms per training step, aspirin batch 5 and 32, one thread
  equireann-bench bench=train_step train_step.device=cuda models=[equireann,schnet,mace]
  equireann-bench bench=large                       # GPU: water boxes up to 1M atoms, out of memory → "OOM"
  equireann-bench bench=accuracy                    # equal-budget training on rMD17 aspirin, ethanol, …
  equireann-bench bench=quick                       # both, small, under 10 minutes
  equireann-bench bench=accuracy budget.minutes=60 datasets=[aspirin] models=[equireann,mace]

Outputs in the run folder (``bench_runs/<mode>/<time>/``): ``speed.md``, ``speed.csv``, ``speed.png``,
``train_step.md``, ``train_step.csv``,
``accuracy.md``, ``accuracy.csv``, ``learning_curves_<dataset>.png``, ``report.md`` (all tables) and
the training run folders (``accuracy/<dataset>/<model>/``). Running again with
``hydra.run.dir=<that folder>`` finishes an interrupted accuracy bench (finished runs are not retrained)
or rebuilds its report. The benchmarks themselves: :mod:`pyg_equireann.experiments.bench`.
"""
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pyg_equireann.cli import hydra_entry, user_errors


def run(cfg: DictConfig) -> Path:
    from pyg_equireann.experiments.bench import run_bench  # torch, Lightning: after Hydra's checks

    report = run_bench(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(report.read_text().split("\n\n", 1)[1])
    print(f"\nreport: {report}")
    return report


@hydra_entry("bench")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
