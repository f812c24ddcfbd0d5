#!/bin/bash
# Every GPU measurement of the engine issue in one run (docs/engine.md "Not measured here"), for a CUDA machine
# with torch, torch_geometric and lightning but no network. Prepare the other wheels here first (Python 3.12):
#   mkdir -p .gpu_wheels && echo /.gpu_wheels/ >> .git/info/exclude && pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 -d .gpu_wheels hydra-core==1.3.2 omegaconf==2.3.0 ase==3.29.0 vesin==0.6.2 vesin-torch==0.6.2
#   (antlr4-python3-runtime==4.9.3 is an sdist: pip wheel --no-deps -w .gpu_wheels antlr4-python3-runtime==4.9.3)
# then run it with the device tool: command "bash benchmarks/gpu_engine.sh", carry [".gpu_wheels"], timeout 540 s.
# Results go to $OUT (or ./gpu_results).
set -u
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
DEPS=/tmp/gpu_deps; pip install -q --no-index --no-deps --target $DEPS .gpu_wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=$DEPS:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
run() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | tail -40; }
# 1. host synchronisations of a training step and an energy+forces call on CUDA (test: <= 2 each)
run 120 python - <<'PY' | tee "$OUT/syncs.txt"
import torch
from torch_geometric.data import Batch, Data
from pyg_equireann import EquiREANN, energy_forces_stress
from pyg_equireann.training.module import PotentialModule
from pyg_equireann.utils import count_host_syncs
import numpy as np
d = np.load("data/rmd17/rmd17_aspirin_train_01.npz")
model = EquiREANN(elements=[1, 6, 8], avg_num_neighbors=10.0).cuda()
z = torch.as_tensor(d["nuclear_charges"]).cuda()
data = [Data(z=z, pos=torch.as_tensor(d["coords"][k], dtype=torch.float32).cuda(),
             energy=torch.zeros(1, dtype=torch.float64).cuda(), forces=torch.zeros(21, 3).cuda()) for k in range(5)]
for x in data:
    x.edge_index = model.build_graph(x.pos)[0]
batch = Batch.from_data_list(data)
module = PotentialModule(model)
opt = module.configure_optimizers()["optimizer"]
def step():
    loss = module.training_step(batch, 0); loss.backward(); opt.step(); opt.zero_grad()
step()
print("training step", count_host_syncs(step, device="cuda"))
print("energy+forces", count_host_syncs(lambda: energy_forces_stress(model, batch.z, batch.pos, batch.batch,
      edge_index=batch.edge_index, num_graphs=batch.num_graphs), device="cuda"))
PY
# 2. training step of every model, batch 5 and 32, eager and compiled EquiREANN (targets: <= 8 ms, >= 5x MACE, >= 2x SchNet)
run 240 python -m pyg_equireann.cli.bench bench=train_step train_step.device=cuda models=[equireann,equireann_compiled,equireann_nopassing,schnet,mace] hydra.run.dir="$OUT/train_step"
# 3. neighbour lists on the GPU, 10k to 1M atoms, and their share of an energy+forces call (targets: <= 30 %, flat per atom)
run 150 python benchmarks/bench_neighbors.py --device cuda --sizes 10000 100000 1000000 --model | tee "$OUT/neighbors.txt"
# 4. energy+forces of large water boxes end to end (target: 98k atoms <= 30 ms), OOM reported
run 150 python -m pyg_equireann.cli.bench bench=large models=[equireann,equireann_nopassing] hydra.run.dir="$OUT/large"
# 5. compiled against eager energy+forces, and orbital passing's cost, on the GPU (graph given)
run 200 python benchmarks/bench_engine.py --device cuda --systems aspirin32 water10000 water100000 --repeats 20 | tee "$OUT/engine.txt"
