#!/usr/bin/env bash
# The GPU check, in under 8 minutes: the search-step table on CUDA, then the search stage on Ray Train with one GPU
# worker (NCCL), the path that CPU machines never run.
#
#   bash bench/gpu.sh        # writes bench/speed_gpu.json; record the figures in bench/README.md
#
# 1. bench/speed.py at the paper's batch of 64 (8 cells, C=16, 32x32): eager against compiled, fp32 against bf16,
#    the exact Hessian product and PC-DARTS; CUDA-event timing, peak = max_memory_allocated, shares of the
#    measured fp32 and bf16 matmul rates. Every row in a fresh process; compiled rows warm up 3 steps.
# 2. python -m components.search with ray.use_gpu=true on a local Ray: Train's NCCL process group, the supernet on
#    cuda:0, a checkpoint and the genotype written; its epoch lines give images/s through Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"

timeout 330 python bench/speed.py --device cuda --batch 64 --threads 4 --warmup 2 --iters 5 --json bench/speed_gpu.json \
  --only plain default default+bf16 default+compile default+compile+bf16 default+exact "pc-darts K=4"

store=$(mktemp -d /tmp/raydarts-gpu.XXXXXX)
RAY_ADDRESS="" OMP_NUM_THREADS=4 timeout 150 python -m components.search --config quick --name gpu-stage \
  --set ray.use_gpu=true --set ray.gpus_per_worker=1 --set ray.cpus_per_worker=2 --set ray.num_workers=1 \
  --set search.epochs=2 --set search.batch_size=64 --set "ray.storage_path=$store"
test -s "$store/gpu-stage/outputs/genotype.json" && echo "gpu-stage: genotype written under $store"
