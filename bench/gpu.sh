#!/usr/bin/env bash
# The GPU check, in under 8 minutes: the search stage on Ray Train with one GPU worker (NCCL), the path that CPU
# machines never run, whether a captured CUDA graph step gives the eager one's α and weights, then the search-step
# table on CUDA.
#
#   bash bench/gpu.sh        # writes bench/speed_gpu.json; figures: bench/README.md
#
# 1. python -m components.search with ray.use_gpu=true on a local Ray: Train's NCCL process group, the supernet on
#    cuda:0 with its step captured as a CUDA graph (search.speed.cuda_graph, batched edges), a checkpoint and the
#    genotype written; its epoch lines give images/s through Ray.
# 2. bench/cuda_graph_check.py, DARTS and then PC-DARTS (K=4): eager and graphed searchers side by side, 8 steps with
#    one capture again after a new learning rate, first and second order; exits 1 unless α and every weight agree
#    within 1e-4.
# 3. bench/speed.py at the paper's batch of 64 (8 cells, C=16, 32x32): plain against default path, batched edges
#    (search.speed.batched_edges, the default) against edge by edge, the captured step with and without them and for
#    PC-DARTS, fp32 against bf16 and PC-DARTS eager; CUDA-event timing, peak = max_memory_allocated, shares of the
#    measured fp32 and bf16 matmul rates, operators per step. All rows in one process (CUDA's start-up paid once),
#    each written to the JSON as it finishes.
# Each part has its own timeout, so one that overruns still leaves the others' figures. (The compiled rows,
# search.speed.compile, did not finish compiling within this script's time on the first GPU run: bench/speed.py runs
# them alone, its case default+compile.)
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
status=0

store=$(mktemp -d /tmp/raydarts-gpu.XXXXXX)
RAY_ADDRESS="" OMP_NUM_THREADS=4 timeout 150 python -m components.search --config quick --name gpu-stage \
  --set ray.use_gpu=true --set ray.gpus_per_worker=1 --set ray.cpus_per_worker=2 --set ray.num_workers=1 \
  --set search.epochs=2 --set search.batch_size=64 --set "ray.storage_path=$store" \
  --set search.speed.cuda_graph=true || status=1
if test -s "$store/gpu-stage/outputs/genotype.json"; then echo "gpu-stage: genotype written under $store"
else echo "gpu-stage: no genotype under $store"; status=1; fi

timeout 90 python bench/cuda_graph_check.py || status=1
timeout 60 python bench/cuda_graph_check.py --partial-channels 4 || status=1

timeout 300 python bench/speed.py --device cuda --batch 64 --threads 4 --warmup 1 --iters 3 --json bench/speed_gpu.json \
  --only default+cuda_graph "pc-darts K=4+cuda_graph" default-batched+cuda_graph plain default default-batched \
  default+bf16 "pc-darts K=4" \
  || status=1
exit $status
