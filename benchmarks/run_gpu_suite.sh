#!/usr/bin/env bash
# One-call GPU benchmark of the Triton backend (about 6 minutes on one H100/H200), from the source tree:
# no install, PYTHONPATH=src. Results (JSON + markdown) and the raw log go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
fi
mkdir -p benchmarks/results
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="benchmarks/results/gpu_suite_${stamp}"
unset TRITON_INTERPRET
echo "python: $PY; writing ${out}.{json,md,log}"
PYTHONPATH=src "$PY" benchmarks/gpu_suite.py --out "$out" "$@" 2>&1 | tee "${out}.log"
