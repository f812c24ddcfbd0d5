"""``equireann-train``: train a potential with Lightning, configured by Hydra (``conf/train.yaml``): compose,
then :func:`pyg_equireann.training.runs.train` (data, module, trainer from the config, ``trainer.fit``, test).

Every run writes one folder (``runs/<model>_<data>/<time>/``, ``<time>-2`` ... for runs started in the same
second): ``.hydra/`` (composed config, overrides), ``config_resolved.yaml``, ``logs/metrics.csv`` (CSV log;
``logs_resumed_*`` after a resume), ``checkpoints/{best,last}.ckpt``, ``learning_curve.png``,
``train_summary.json`` (epochs, steps, parameters, training time, why it stopped), ``test_metrics.json``,
``train.log`` and ``run_info.json`` (package versions, git commit, platform, torch settings;
``run_info_resumed_<time>.json`` for each resumption). Checkpoints are written atomically
(:class:`~pyg_equireann.training.checkpoint.AtomicCheckpointIO`); ``last.ckpt`` is the last epoch (or the state
at an interrupt), ``best.ckpt`` the best by validation loss.

Resuming (``ckpt_path=<run>/checkpoints/last.ckpt``) continues in the run's folder with the run's recorded
config (``.hydra/config.yaml``), not the defaults; overrides that would make it another experiment are
refused (:func:`~pyg_equireann.training.runs.resume_config`). Each resume adds its own record,
``resumes/<time>/`` (``config.yaml``, ``config_resolved.yaml``, ``overrides.yaml``, ``hydra.yaml``); the run's
first record is never overwritten.
"""
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pyg_equireann.cli import _log_to_files, hydra_entry, user_errors
from pyg_equireann.config import check_output_folders

log = logging.getLogger("equireann-train")


def run(cfg: DictConfig) -> Optional[float]:
    """Train the run of ``cfg`` (composed by Hydra) and print its summary; returns ``cfg.optimized_metric``'s
    value (for sweeps). SIGTERM (a batch system's time limit) exits with 143 after saving ``last.ckpt``."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("ckpt_path") is None:  # a new run's folders, before importing torch and Lightning (~7 s)
        check_output_folders(cfg, out_dir)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from pyg_equireann.training.evaluation import metrics_table
    from pyg_equireann.training.runs import resume_config, train, write_config_record

    cfg = resume_config(cfg)
    check_output_folders(cfg, out_dir)
    config_record = write_config_record(cfg, out_dir)
    try:
        result = train(cfg, out_dir, config_record)
    except SIGTERMException:  # a SystemExit without code: the job would look successful
        log.error("terminated (SIGTERM); resume with ckpt_path=%s", out_dir / "checkpoints" / "last.ckpt")
        sys.exit(128 + signal.SIGTERM)
    summary = result.summary
    if result.trainer.is_global_zero:
        stopped = summary.get("stop_reason")
        print(f"\n{summary['model']} trained for {summary['epochs']} epochs ({summary['parameters']:,} parameters)"
              + (f"; stopped because {stopped}" if stopped else ""))
        if result.results:
            print(metrics_table(result.results))
            _log_to_files(logging.INFO, "test metrics (best.ckpt)\n" + metrics_table(result.results))  # printed above
        print(f"run folder: {out_dir}")
        if result.curve:
            print(f"learning curve: {result.curve}")
    metric = cfg.get("optimized_metric")
    if metric:
        value = result.trainer.callback_metrics.get(metric)
        return float(value) if value is not None else float("inf")
    return None


@hydra_entry("train")
def main(cfg: DictConfig) -> Optional[float]:
    with user_errors():
        return run(cfg)


if __name__ == "__main__":
    main()
