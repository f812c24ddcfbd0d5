"""What the training loop costs around the step: ``trainer.fit`` of a fixed number of steps with this package's
EMA (foreach updates over cached tensor lists) and training metrics summed per epoch, against the previous loop
(three ``self.log`` calls per step, Lightning's per-parameter EMA update), interleaved in one process.

Usage: ``python benchmarks/bench_training_loop.py [--molecule malonaldehyde] [--model equireann] [--steps 400]
[--rounds 3] [--compile]`` (rMD17 from the shipped data, batch 5, one thread, CPU time of the timed steps).
Prints ms per step (median over rounds) and the ratio previous ÷ now.
"""
import argparse
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from omegaconf import OmegaConf

from pyg_equireann.experiments.bench.train_step import compose_training
from pyg_equireann.experiments.harness import model_configs
from pyg_equireann.training.callbacks import EMA
from pyg_equireann.training.prepare import build_module


def previous_ema_update(decay: float):
    """The per-parameter warm-up EMA of the previous loop (``AveragedModel`` ``avg_fn``)."""
    def update(ema_param, current_param, num_averaged):
        n = num_averaged.to(ema_param.dtype)
        return ema_param + (current_param - ema_param) * (1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay))
    return update


def previous_loop(module):
    """``module`` with the previous per-step logging (three ``self.log`` calls in ``training_step``)."""
    cls = type(module)

    class PreviousLogging(cls):
        def training_step(self, batch, batch_idx):
            out = self.predict_batch(batch, create_graph=True)
            loss, errors = self._loss_and_errors(batch, out)
            self.check_finite(batch, out, loss)
            n = int(batch.num_graphs)
            self.log("train/loss", loss.float(), on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
            self.log("train/energy_mae", 1e3 * errors["energy"].detach().abs().mean().float(), on_step=False,
                     on_epoch=True, batch_size=n)
            self.log("train/forces_mae", 1e3 * errors["forces"].detach().abs().mean().float(), on_step=False,
                     on_epoch=True, batch_size=n)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            pass

    module.__class__ = PreviousLogging
    return module


class StepClock(Callback):
    """CPU time of the training batches after the first ``skip`` (compilation, warm-up)."""

    def __init__(self, skip: int):
        self.skip, self.seconds, self.steps, self._start = skip, 0.0, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.process_time() if trainer.global_step >= self.skip else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            self.seconds += time.process_time() - self._start
            self.steps += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", default="malonaldehyde")
    parser.add_argument("--model", default="equireann", help="a conf/model name")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="model.compile=true (the CPU benchmarks' recipe)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = model_configs([args.model], {args.model: {"compile": True} if args.compile else {}})[args.model]
    datamodule, module_cfg = compose_training(["data=rmd17", f"data.molecule={args.molecule}"],
                                              float(config["cutoff"]), module_overrides={"scheduler": "none"})
    datamodule.batch_size = 5
    modules = {}
    for name in ("previous", "now"):
        torch.manual_seed(0)
        module = build_module(OmegaConf.create(dict(config)), module_cfg, datamodule, False)
        modules[name] = previous_loop(module) if name == "previous" else module

    def fit(name, steps, skip):
        if name == "previous":
            ema = EMAWeightAveraging(decay=0.99, use_buffers=False)
            ema._kwargs["avg_fn"] = previous_ema_update(0.99)
        else:
            ema = EMA(decay=0.99, warmup=True, use_buffers=False)
        clock = StepClock(skip)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[ema, clock])
        trainer.fit(modules[name], datamodule=datamodule)
        return 1e3 * clock.seconds / max(clock.steps, 1)

    for name in modules:  # warm-up: compilation, first epoch
        fit(name, 20, 20)
    times = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name in modules:
            times[name].append(fit(name, args.steps, 10))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"rMD17 {args.molecule}, model={args.model}{' compiled' if args.compile else ''}, batch 5, one thread, "
          f"{args.steps} steps x {args.rounds} rounds (CPU ms per step inside training batches)")
    for name, values in times.items():
        print(f"  {name:9s} median {median[name]:.2f} ms  rounds " + ", ".join(f"{v:.2f}" for v in values))
    print(f"  previous / now = {median['previous'] / median['now']:.2f}")


if __name__ == "__main__":
    main()
