#!/bin/bash
# The GPU runs of the accuracy study (docs/accuracy.md): rMD17 aspirin, EquiREANN (model=equireann) against
# MACE at 1 and 5 minutes of wall-clock training time each (conf/bench/accuracy_gpu.yaml), the two models side
# by side on the one GPU, both budgets at once: four trainings share it (each run's budget counts its
# wall-clock time inside training steps). For a CUDA machine with torch, torch_geometric and
# lightning but no network: carry the wheels of benchmarks/gpu_engine.sh's header plus those of MACE
# (mace-torch==0.3.16 e3nn==0.4.4 torch-ema==0.3 matscipy==1.3.1 prettytable wcwidth configargparse
# python-hostlist GitPython gitdb smmap lmdb orjson) in .gpu_wheels/. About 7 minutes.
set -u
OUT=$(realpath -m ${OUT:-gpu_results}); mkdir -p "$OUT"
DEPS=/tmp/gpu_deps
pip install -q --no-index --no-deps --target $DEPS .gpu_wheels/*.whl 2>&1 | tail -2
pip install -q --no-index --no-deps --no-build-isolation --target $DEPS . 2>&1 | tail -2
export PYTHONPATH=$DEPS PATH=$DEPS/bin:$PATH PYG_EQUIREANN_DATA=$PWD/data PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
# run from outside the checkout: its pyg_equireann/ lacks the installed conf and datamodules packages
bench() { (cd /tmp && timeout "$1" python -m pyg_equireann.cli.bench "${@:2}" 2>&1 | grep -v "^\[.*INFO\]" | tail -30); }
mkdir -p /tmp/gpu_runs
# both budgets at once (four trainings side by side: a call of the device tool has 10 minutes)
for minutes in 1 5; do
  bench $((minutes * 60 + 200)) bench=accuracy_gpu budget.minutes=$minutes accuracy.jobs=2 \
    hydra.run.dir=/tmp/gpu_runs/acc_${minutes}min > /tmp/gpu_runs/log_${minutes}min.txt &
  sleep 20
done
wait
for minutes in 1 5; do
  run=/tmp/gpu_runs/acc_${minutes}min
  echo "== $minutes GPU-minutes"; tail -8 /tmp/gpu_runs/log_${minutes}min.txt; cat $run/accuracy.md
  cp $run/accuracy.md $OUT/accuracy_${minutes}min.md; cp $run/accuracy/curves.json $OUT/curves_${minutes}min.json
  cp $run/accuracy/step_curves.json $OUT/step_curves_${minutes}min.json
done
