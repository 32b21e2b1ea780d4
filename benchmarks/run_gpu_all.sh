#!/usr/bin/env bash
# Everything a GPU session has to check, in one call of about 8 minutes (the device budget is 15 minutes per session,
# start-up included): the Triton tests compiled on the GPU (GPU-only bf16 / large-shape cases included), the
# training/decoding suite `gpu_suite.py`, and the decode benchmark `gpu_decode.py`. Each stage has its own time
# limit, so a slow stage cannot starve the others. From the source tree (PYTHONPATH=src, no install).
# Logs and results go to benchmarks/results/ and, when $OUT is set (the device tool's return folder), to $OUT too.
#   bash benchmarks/run_gpu_all.sh            # card name for the file names: nvidia-smi, else "gpu"
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH=src
unset TRITON_INTERPRET
card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr -s '_' | tr 'A-Z' 'a-z')"
card="${card:-gpu}"
res=benchmarks/results
mkdir -p "$res"
log="$res/${card}_all.log"
: > "$log"
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
stage tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton_nsa.py tests/test_triton_kernels.py tests/test_decode_triton.py
stage suite 240 "$PY" benchmarks/gpu_suite.py --out "$res/${card}_suite" --budget-s 200
stage decode 75 "$PY" benchmarks/gpu_decode.py --out "$res/${card}_decode.json"
if [ -n "${OUT:-}" ]; then cp "$res/${card}"_* "$OUT"/ 2>/dev/null; fi
echo "done: $res/${card}_*" | tee -a "$log"
