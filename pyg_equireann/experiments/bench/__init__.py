"""Benchmark suite (``equireann-bench``): speed/memory and equal-budget accuracy of EquiREANN and
other GNN potentials, with Markdown/CSV/PNG reports."""
import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-call info and warnings while many short evaluations run."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
