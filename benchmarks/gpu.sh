#!/usr/bin/env bash
# The GPU path in one go, for a machine with CUDA (well under 8 minutes on one H100):
#   1. `pytest -m gpu`: every neural model trains on CUDA (bf16 autocast) and scores like a CPU
#      copy, HNVM's sparse tables on CUDA, `--device cuda` runs, NCCL DDP when there are 2 GPUs;
#   2. training/evaluation throughput of HNVM on CUDA (paper sizes, then defaults): the
#      Instacart sample and the 60K-item synthetic set, bare steps + full-ranking evaluation;
#   3. the same benchmark on the CPU of that machine for the ratio (one data set, few steps).
# Usage: benchmarks/gpu.sh [OUT_DIR]   (default: gpu-results/; each step's output is saved)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'no GPU'); sys.exit(0 if ok else 1)" \
  || { echo "gpu.sh: CUDA is not available here" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv" || true

start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start ))s)"; }

# each step has a time limit (together 7 min); a failing step does not stop the later ones
status=0
step "pytest -m gpu"
timeout 180 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs 2>&1 | tee "$OUT/pytest-gpu.txt" || status=1

step "throughput on CUDA, paper sizes (H = 200)"
timeout 110 "$PY" benchmarks/train_eval.py --device cuda --datasets instacart,synthetic60k --steps 50 \
  --eval-targets 5000 --no-fit 2>&1 | tee "$OUT/train_eval-cuda-paper.txt" || status=1

step "throughput on CUDA, defaults (H = 100), Adam"
timeout 90 "$PY" benchmarks/train_eval.py --device cuda --datasets instacart,synthetic60k --steps 50 \
  --eval-targets 5000 --no-fit --default-config --optimizer adam 2>&1 | tee "$OUT/train_eval-cuda-default.txt" \
  || status=1

step "the same host's CPU, paper sizes (for the ratio)"
timeout 40 "$PY" benchmarks/train_eval.py --device cpu --datasets instacart --steps 10 \
  --eval-targets 1000 --no-fit 2>&1 | tee "$OUT/train_eval-cpu-paper.txt" || status=1

step "done (status $status)"
exit $status
