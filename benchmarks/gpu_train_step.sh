#!/bin/bash
# Training step on the GPU, EquiREANN (recipe) eager and compiled against MACE, aspirin batch 32
# (equireann-bench bench=train_step). Wheels as in benchmarks/gpu_accuracy.sh. About 3 minutes.
set -u
OUT=$(realpath -m ${OUT:-gpu_results}); mkdir -p "$OUT"
DEPS=/tmp/gpu_deps
pip install -q --no-index --no-deps --no-build-isolation --target $DEPS .gpu_wheels/*.whl . 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$DEPS PYG_EQUIREANN_DATA=$PWD/data PYTHONUNBUFFERED=1
cd /tmp && timeout ${STEP_TIMEOUT:-170} python -m pyg_equireann.cli.bench bench=train_step \
  models=[equireann,equireann_compiled,mace] train_step.device=cuda train_step.batch_sizes=[32] \
  train_step.repeats=15 train_step.warmup=3 train_step.threads=4 hydra.run.dir=/tmp/gpu_runs/train_step 2>&1 \
  | grep -v "INFO\|Warning\|warn" | tail -5
cp /tmp/gpu_runs/train_step/train_step.md "$OUT/" && cat "$OUT/train_step.md"
