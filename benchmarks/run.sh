#!/usr/bin/env bash
# The standard benchmark set on this machine's device (the GPU if there is one, else the CPU). Each
# command prints its table and ends with a JSON line, appended to $RESULTS (benchmarks/results.jsonl).
#   bash benchmarks/run.sh
#   PYTHONPATH=. RESULTS=$OUT/results.jsonl bash benchmarks/run.sh   # from the tree, uninstalled
set -euo pipefail
cd "$(dirname "$0")/.."
save=(--save "${RESULTS:-benchmarks/results.jsonl}")
bench() { python3 -m parameternet_llm_cli bench "$@"; }
layer=()  # GPU: one FFN projection of LLaMA-1B, 16384 tokens; CPU: of the cpu-small shape, 2048 tokens
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  layer=(--tokens 2048 --in-features 256 --out-features 688)
bench layer "${layer[@]}" --backends grouped_mm,loop "${save[@]}"
bench layer "${layer[@]}" --backends grouped_mm --capacity-factor 1.25 "${save[@]}"
bench train "${save[@]}"                          # 8 experts on gate+up+down
bench train --projections up_proj "${save[@]}"    # the paper's best row
bench decode "${save[@]}"
