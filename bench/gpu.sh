#!/usr/bin/env bash
# The search-step table on CUDA (paper setting: batch 64, 8 cells, C=16, 32x32): plain vs default paths, first and
# second order, exact HVP, checkpointing, PC-DARTS; every row in a fresh process, peak = max_memory_allocated.
# Not yet here (see bench/README.md): CUDA-event timing, compiled and bf16 rows, the Ray Train search stage.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
timeout 420 python bench/speed.py --device cuda --batch 64 --threads 4 --warmup 2 --iters 5 --json bench/speed_gpu.json
