#!/usr/bin/env bash
# Everything a GPU session has to check, in one call of at most ~10 minutes, ~8 with SKIP_TRAIN=1 (the device
# budget is 15 minutes per session, start-up included). Stages, most valuable first, each with its own time limit so a slow stage cannot
# starve the others:
#   suite  - gpu_suite.py: bf16 correctness vs the reference, packed vs padded tiles, paper config and G sweep timings
#   decode - gpu_decode.py: the decode step vs SDPA over the dense cache, 8k..128k, batch 1 and 16; the eager layer
#            step vs a dense layer step (64k); a chunked prefill, Triton vs torch
#   profile - gpu_profile.py: kernel-by-kernel GPU time and host idle share of a forward, a fwd+bwd (4k, 64k) and a
#            decode step (64k, batch 1 and 16)
#   generate - gpu_generate.py: ms per generated token after an 8k prompt, NSA eager and CUDA graph vs full
#   tests  - the Triton test files compiled on the GPU (GPU-only bf16 / large-shape cases included)
#   train  - a 20-step small-gpu training run, NSA then full attention (bf16 autocast, tokens/s in metrics.jsonl)
# From the source tree (PYTHONPATH=src, no install). Logs and results go to benchmarks/results/<card>_* and, when $OUT
# is set (the device tool's return folder), are copied there after every stage.
#   bash benchmarks/run_gpu_all.sh            # card name for the file names: nvidia-smi, else "gpu"
# Knobs for a shorter rerun: SUITE_ARGS (extra gpu_suite.py arguments, e.g. --skip-packing), SUITE_S / DECODE_S /
# PROFILE_S / GENERATE_S / TESTS_S (stage limits in seconds), SKIP_TRAIN=1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH=src PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr -s '_' | tr 'A-Z' 'a-z')"
card="${card:-gpu}"
res=benchmarks/results
mkdir -p "$res"
log="$res/${card}_all.log"
: > "$log"
export_out() {  # this run's files only ($OUT takes at most 8 files)
  if [ -n "${OUT:-}" ]; then
    for f in "$log" "$res/${card}_suite.json" "$res/${card}_suite.md" "$res/${card}_decode.json" \
      "$res/${card}_train_nsa.jsonl" "$res/${card}_train_full.jsonl" "$res/${card}_profile.json" \
      "$res/${card}_profile.md"; do [ -f "$f" ] && cp "$f" "$OUT"/; done
  fi
}
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
  export_out
}
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$log"
suite_s=${SUITE_S:-185}
stage suite "$suite_s" "$PY" benchmarks/gpu_suite.py --out "$res/${card}_suite" --budget-s $((suite_s - 35)) ${SUITE_ARGS:-}
stage decode "${DECODE_S:-80}" "$PY" benchmarks/gpu_decode.py --out "$res/${card}_decode.json"
stage profile "${PROFILE_S:-60}" "$PY" benchmarks/gpu_profile.py --out "$res/${card}_profile"
# end-to-end generation, NSA eager and as a replayed CUDA graph vs full attention (its table is in the log)
stage generate "${GENERATE_S:-45}" "$PY" benchmarks/gpu_generate.py --out "$res/${card}_generate.json"
opts=""
"$PY" -c "import xdist" 2>/dev/null && opts="-n 8"
"$PY" -c "import pytest_timeout" 2>/dev/null && opts="$opts --timeout 45"  # a stuck test fails with its stack
# -v: one line per test as it finishes, so a stage cut by its limit still names what passed and what errored
# one launch config per kernel (no autotuning): the tests check numbers, not speed, and compile 3x less
NSA_TRITON_AUTOTUNE=0 stage tests "${TESTS_S:-120}" "$PY" -m pytest -v -rfE --durations=10 -p no:cacheprovider $opts tests/test_triton_nsa.py \
  tests/test_triton_kernels.py tests/test_decode_triton.py tests/test_compile.py::test_compiled_triton_op_matches_reference \
  tests/test_compile.py::test_compiled_triton_op_bf16_matches_eager_on_gpu \
  tests/test_model.py::test_gpu_generate_with_a_cuda_graph_equals_eager
[ -n "${SKIP_TRAIN:-}" ] || for att in nsa full; do
  rm -rf "/tmp/gpu_train_$att"
  stage "train_$att" 45 "$PY" -m nsa.cli train --preset small-gpu --attention "$att" --steps 20 --set log_every=5 --no-progress \
    --out "/tmp/gpu_train_$att"
  cp "/tmp/gpu_train_$att/metrics.jsonl" "$res/${card}_train_$att.jsonl" 2>/dev/null
done
export_out
echo "done: $res/${card}_*" | tee -a "$log"
