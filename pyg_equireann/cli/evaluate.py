"""``equireann-eval``: evaluate a checkpoint on a data module's test set(s).

Prints a metrics table and writes ``metrics.json``, ``parity.png`` (energy and force parity) and
``errors.csv`` (one row per structure) into ``<run>/eval/<data>_<time>/``. Test sets with several
config types (``data.config_type_key``) are also reported per type. Files alone need no training data:
``equireann-eval ckpt_path=<run>/checkpoints/best.ckpt data=xyz 'data.test_files=[a.xyz,b.xyz]'``.
"""
import shutil
from pathlib import Path
from typing import Dict

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pyg_equireann.cli import check_writable, hydra_entry, user_errors


def _remove_if_unused(out_dir: Path) -> None:
    """Delete ``out_dir`` (and an emptied ``eval/`` above it) if it holds nothing but Hydra's records and
    logs, so that a failed evaluation leaves no empty result folder."""
    if not out_dir.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in out_dir.iterdir()):
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    parent = out_dir.parent
    if parent.name == "eval" and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def run(cfg: DictConfig) -> Dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on the test sets of ``cfg.data``; a failed call leaves no result folder."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_writable(out_dir, "eval folder")
        from pyg_equireann.training.evaluation import run_evaluation  # torch, Lightning: after the checks

        return run_evaluation(cfg, out_dir)
    except BaseException:
        _remove_if_unused(out_dir)
        raise


@hydra_entry("eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
