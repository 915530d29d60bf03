#!/usr/bin/env bash
# mini8 on a CUDA machine: suite build, WEMoE batched vs per-sample, and every method's paper preset.
#   PY=python3 bash benchmarks/gpu_mini8.sh OUTDIR
# The suite is rebuilt on the GPU (its weights differ from the CPU build in the last bits, so its
# fingerprint and accuracies are its own); every line of output goes to OUTDIR/gpu_mini8.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUTDIR="${1:-benchmarks/results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  /usr/bin/time -f "suite build wall %e s" $PY -m merging suite build mini8 --device cuda
  $PY benchmarks/bench_wemoe.py --suite mini8 --device cuda --images 512 --batch-size 64
  $PY benchmarks/bench_wemoe.py --suite mini8 --device cuda --images 512 --batch-size 16
  /usr/bin/time -f "paper table wall %e s" $PY -m merging table --suite mini8 --device cuda --preset paper --normalized \
    --csv "$OUTDIR/mini8_methods_paper_cuda.csv" --methods \
    pretrained,weight_averaging,task_arithmetic,ties,adamerging,wemoe,tinting,surgery:base=task_arithmetic,surgery:base=adamerging,surgery:base=task_arithmetic\;version=2,individual
} 2>&1 | tee "$OUTDIR/gpu_mini8.log"
