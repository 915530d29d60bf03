#!/usr/bin/env bash
# The built-in ablation set on mini8 (fast preset, seed 0), tables into benchmarks/results/ablations/.
set -euo pipefail
cd "$(dirname "$0")/.."
export NUMBA_CACHE_DIR="$PWD/cache/numba"
for a in ta_lambda num_tasks ties_density tinting_layer wemoe_router_depth wemoe_blocks surgery_rank; do
  echo "== $a"
  /usr/bin/time -f "$a: %e s" .venv/bin/python -m merging sweep --config "ablations/$a.yaml" --seeds 0 --csv "benchmarks/results/ablations/$a.csv"
done
