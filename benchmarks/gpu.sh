#!/usr/bin/env bash
# benchmarks/gpu.sh -- the GPU suite on one H100 / H200, in under 8 minutes, peers in the same invocation.
#
# Runs `python -m benchmarks.run --suite gpu`: random weights in the Qwen3-0.6B shape (benchmarks/models.py,
# written from a config dict, nothing downloaded), bf16 compute, the shapes of shared/reference/peer-baselines.md:
#   - bf16 matmul peak, 8192^3, in jax and in torch (the MFU denominator is the larger median);
#   - training tokens/s, forward_backward + optim_step: LoRA r32 alpha 32 on q/k/v/o/gate/up/down at 8x2048 and
#     16x1024, full fine-tuning at 8x2048 -- ours vs transformers(+peft); skyrl-tx recorded as not installed;
#   - MFU rows: 6N + causal attention (full FT), 4N + attention (LoRA), over the measured peak;
#   - decode tokens/s, batch 64 and 1 (16 left out for time), prompt 128, +256 tokens, greedy -- ours vs generate;
#   - weight handoff to the first sampled token; cold start with and without the persistent compile cache.
# The REST front door is not measured here (the GPU machine has no fastapi/uvicorn; nothing here imports server/).
# Figures left when the time budget runs out are reported as "skipped: ..."; a SIGTERM still writes the JSON.
#
# Preparing the machine: it has jax+CUDA, flax, optax, orbax, transformers and torch, but not the `tinker` SDK
# (tinker_jax uses tinker.types) and maybe not peft (the LoRA peer). On a machine with internet, from the repo root:
#     F="--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
#        --platform manylinux2014_x86_64 --platform any"
#     pip download tinker==0.38.0 -d .whl $F
#     pip download peft==0.21.2 accelerate psutil --no-deps -d .whl $F
#     rm .whl/numpy-* .whl/transformers-*   # present there already; keeps .whl/ near 30 MB
# (.whl/ is git-ignored: carry it to the GPU machine, e.g. the device runner's carry=[".whl"], 64 MiB at most).
# This script installs from .whl/ only what is missing: tinker (required) and peft (optional: without it the LoRA
# peer's figures say "unavailable: ...").
#
# Usage: bash benchmarks/gpu.sh [--dry-run] [--out FILE] [extra benchmarks.run arguments, e.g. --only train]
#   --dry-run   the same code paths at toy size (suite gpu-dryrun) on any device, a CPU included (tested in
#               tests/test_bench_gpu.py).
#   --out FILE  JSON rows (default: $OUT/gpu-bench.json when $OUT is set, else benchmarks/gpu-latest.json).
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=gpu
OUT_FILE=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) SUITE=gpu-dryrun; shift ;;
    --out) OUT_FILE="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [ -z "$OUT_FILE" ]; then
  if [ -n "${OUT:-}" ]; then OUT_FILE="$OUT/gpu-bench.json"; else OUT_FILE="benchmarks/gpu-latest.json"; fi
fi
PY="${PYTHON:-python3}"
WORK="${TINKER_JAX_BENCH_DIR:-/tmp/tinker-jax-bench}"
LIMIT="${BENCH_TIMEOUT_S:-440}"  # hard stop (SIGTERM -> the JSON of what was measured), below the 8 minutes

if ! "$PY" -c "import tinker.types" >/dev/null 2>&1; then
  if [ -d .whl ]; then
    echo "[gpu.sh] installing the tinker SDK from .whl/" >&2
    "$PY" -m pip install -q --no-index --find-links .whl tinker
  else
    echo "[gpu.sh] the tinker SDK is not importable and there is no .whl/ (see this script's header)" >&2
    exit 2
  fi
fi
if ! "$PY" -c "import peft" >/dev/null 2>&1 && [ -d .whl ]; then
  echo "[gpu.sh] installing peft from .whl/" >&2
  "$PY" -m pip install -q --no-index --find-links .whl peft || echo "[gpu.sh] no peft: LoRA peer unavailable" >&2
fi

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and jax share the chip; torch runs first and frees its cache
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

timeout -k 30 -s TERM "$LIMIT" "$PY" -m benchmarks.run --suite "$SUITE" --work-dir "$WORK" --out "$OUT_FILE" \
  ${EXTRA[@]+"${EXTRA[@]}"}
