#!/usr/bin/env bash
# The standard benchmark set on this machine's device (the GPU if there is one, else the CPU),
# appended to benchmarks/results.jsonl. Each command prints its table and ends with a JSON line.
#   bash benchmarks/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
save=(--save benchmarks/results.jsonl)
layer=()  # GPU: one FFN projection of LLaMA-1B, 16384 tokens; CPU: of the cpu-small shape, 2048 tokens
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  layer=(--tokens 2048 --in-features 256 --out-features 688)
parameternet-llm bench layer "${layer[@]}" --backends loop,grouped_mm "${save[@]}"
parameternet-llm bench layer "${layer[@]}" --backends grouped_mm --capacity-factor 1.25 "${save[@]}"
parameternet-llm bench train "${save[@]}"                          # 8 experts on gate+up+down
parameternet-llm bench train --projections up_proj "${save[@]}"    # the paper's best row
parameternet-llm bench decode "${save[@]}"
