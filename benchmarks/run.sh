#!/usr/bin/env bash
# The standard benchmark set on this machine's device (the GPU if there is one, else the CPU),
# appended to benchmarks/results.jsonl. Each command prints its table and ends with a JSON line.
#   bash benchmarks/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
save=(--save benchmarks/results.jsonl)
parameternet-llm bench layer --backends loop,grouped_mm "${save[@]}"
parameternet-llm bench layer --backends grouped_mm --capacity-factor 1.25 "${save[@]}"
parameternet-llm bench train "${save[@]}"                          # 8 experts on gate+up+down
parameternet-llm bench train --projections up_proj "${save[@]}"    # the paper's best row
parameternet-llm bench decode "${save[@]}"
