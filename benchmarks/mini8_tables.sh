#!/usr/bin/env bash
# The numbers behind README/BENCHMARKS: every method on mini8 with the given preset (default fast).
#   bash benchmarks/mini8_tables.sh [fast|paper]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-fast}"
PY=.venv/bin/python
export NUMBA_CACHE_DIR="$PWD/cache/numba"
mkdir -p benchmarks/results
/usr/bin/time -f "suite build/load wall %e s" $PY -m merging suite build mini8
$PY -m merging table --suite mini8 --normalized --ta-grid 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0 --csv benchmarks/results/mini8_baselines.csv
$PY -m merging table --suite mini8 --preset "$PRESET" --normalized --csv "benchmarks/results/mini8_methods_$PRESET.csv" --methods \
  pretrained,weight_averaging,task_arithmetic,ties,adamerging,surgery:base=weight_averaging,surgery:base=task_arithmetic,surgery:base=ties,surgery:base=adamerging,surgery:base=task_arithmetic\;version=2,wemoe,tinting,individual
$PY -m merging metrics --suite mini8 --methods individual,weight_averaging,task_arithmetic,ties --reference individual --n 500 --csv benchmarks/results/mini8_bias_baselines.csv > /dev/null
$PY -m merging metrics --suite mini8 --methods "individual,task_arithmetic,surgery:base=task_arithmetic" --reference individual --n 500 --csv benchmarks/results/mini8_bias_surgery.csv > /dev/null
# The data-free frontier (issue #21): each method, and Surgery on each as its base
$PY -m merging table --suite mini8 --preset "$PRESET" --normalized --csv "benchmarks/results/mini8_frontier_$PRESET.csv" --methods \
  pretrained,task_arithmetic,tsv_m,iso_c,iso_cts,cart,wudi,consensus,surgery:base=task_arithmetic,surgery:base=tsv_m,surgery:base=iso_c,surgery:base=iso_cts,surgery:base=cart,surgery:base=wudi,surgery:base=consensus,individual
$PY -m merging metrics --suite mini8 --methods individual,task_arithmetic,tsv_m,iso_c,iso_cts,cart,wudi,consensus --reference individual --n 500 --csv benchmarks/results/mini8_bias_frontier.csv > /dev/null
# Beyond one merged model (issue #18): the storage lane (TALL masks, EMR), FeatCal on three bases, Surgery/SurgeryV2, with each row's cost
$PY -m merging table --suite mini8 --preset "$PRESET" --normalized --cost --csv "benchmarks/results/mini8_storage_featcal_$PRESET.csv" --methods \
  pretrained,task_arithmetic,ties,tall_masks,tall_masks:vectors=ties,emr,featcal,featcal:base=ties,featcal:base=tsv_m,surgery:base=task_arithmetic,surgery:base=task_arithmetic\;version=2,surgery:base=ties,surgery:base=ties\;version=2,adamerging,wemoe,tinting,individual
$PY -m merging metrics --suite mini8 --methods "individual,task_arithmetic,surgery:base=task_arithmetic,surgery:base=task_arithmetic;version=2,featcal,ties,surgery:base=ties,surgery:base=ties;version=2,featcal:base=ties" --reference individual --n 500 --layers --csv benchmarks/results/mini8_bias_fixes.csv > /dev/null
