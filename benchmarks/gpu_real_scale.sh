#!/usr/bin/env bash
# The ViT-B/32-sized rehearsal on a CUDA machine (issue #22): the same generated suites in all three layouts,
# every registered method with its fast preset unshortened (SHORT applies on CPU only), features, UMAP, bias
# metrics and every page in Chromium; wall time, peak RSS and peak GPU memory per step.
#   PY=python3 bash benchmarks/gpu_real_scale.sh [ROOT] [OUTDIR]
# ROOT (default /tmp/real_scale) needs ~25 GB of disk; the table goes to OUTDIR/real_scale_cuda.csv and the log beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
ROOT="${1:-/tmp/real_scale}"
OUTDIR="${2:-benchmarks/results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
CSV="$OUTDIR/real_scale_cuda.csv"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  [ -f "$ROOT/generated.json" ] || $PY benchmarks/real_scale.py generate --root "$ROOT" --images 64
  rm -f "$CSV"
  $PY benchmarks/real_scale.py rehearse --root "$ROOT" --layouts open_clip,task_vectors,hf --methods all --csv "$CSV"
  $PY benchmarks/real_scale.py table --csv "$CSV"
} 2>&1 | tee "$OUTDIR/gpu_real_scale.log"
