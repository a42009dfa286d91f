#!/usr/bin/env bash
# The GPU checks and the standard benchmarks in one run, each output under $RESULTS_DIR (default
# benchmarks/gpu-results): the CUDA tests, `run.sh` (layer, train, decode) and a training step's time per op,
# dense against ParameterNet.
#   bash benchmarks/gpu.sh
#   RESULTS_DIR=$OUT PYTHONPATH=. bash benchmarks/gpu.sh   # from the tree, uninstalled
set -uo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS_DIR:-benchmarks/gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" 2>&1 |
  tee -a "$out/gpu.txt"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
RESULTS="$out/results.jsonl" bash benchmarks/run.sh 2>&1 | tee "$out/bench.txt"
python3 benchmarks/op_breakdown.py --top 40 2>&1 | tee "$out/op_breakdown.txt"
