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
#   - weight handoff to the first sampled token; cold start with and without the persistent compile cache;
#   - tenants (last, in a child process): 8 and 32 LoRA r32 clients at 8x256 tokens each training concurrently vs
#     one at a time vs one adapter at 8x2048, peak device memory of each, 8 concurrent samplers of different
#     adapters; in process (tinker_jax.ServiceClient), not through the REST server. Its wall time is mostly
#     compiling the batch shapes it meets; alone: `bash benchmarks/gpu.sh --only tenants`.
# The REST front door is not measured here (the GPU machine has no fastapi/uvicorn; nothing here imports server/).
# Section "moe" is not in the default run (model write + two frameworks' loads do not fit next to the rest in 8
# minutes); its own invocation, on a fresh machine so that no earlier JAX allocation starves the torch peer:
#     bash benchmarks/gpu.sh --only peak,moe
#   Qwen3-30B-A3B's layer shape (hidden 2048, 32/4 heads of 128, 128 experts of width 768, top-8 renormalised,
#   vocab 151,936, untied) with 4 layers, random weights (3.1B params, 0.85B active; written once, 12.4 GB fp32),
#   bf16: LoRA r32 training tokens/s at 4x512 on attention + every expert's gate/up/down + lm_head (peft converts
#   the expert targets onto the fused experts.gate_up_proj / down_proj), and its MFU on the ACTIVE parameters
#   (4 x n_active_params + attention); decode tokens/s at batch 64, prompt 128 +128 -- ours vs transformers(+peft),
#   the peer first. Ours' experts go through jax.lax.ragged_dot, which lowers to a dense product over all 128
#   experts (E x the active expert FLOPs, [E, rows, D] temporaries): hence 4x512, not 8x2048.
# Figures left when the time budget runs out are reported as "skipped: ..."; a SIGTERM still writes the JSON.
#
# Preparing the machine: it has jax+CUDA, flax, optax, orbax, transformers, torch and peft, but not the `tinker`
# SDK (tinker_jax uses tinker.types) nor pydantic and the SDK's other pure needs. Here, from the repo root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       tinker==0.38.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
#       distro==1.9.0 orjson==3.13.0 sniffio==1.3.1 zstandard==0.25.0 typing_extensions==4.16.0
# (.whl/ is git-ignored, ~9 MB: carry it, e.g. the device runner's carry=[".whl"]). This script installs them
# with --no-deps into /tmp/tinker-jax-site (prepended to PYTHONPATH), then checks the imports before measuring.
#
# Decode against the machine's limit (issue 14), its own invocation: `bash benchmarks/gpu.sh --decode` runs
# benchmarks/decode_bench.py instead: decode at batch 64 and 256 (prompt 128 +256, greedy) with the step-time
# breakdown (prefill + first token, a decode step, its device and host parts) beside the step's floor (weight and
# KV bytes over the read bandwidth measured in the same run, FLOPs over the measured matmul peak), and an RL-shaped
# row (64 prompts x 16 samples, 512-token prompts, up to 1,024 tokens, stopping on EOS). Sampler settings to try:
#     bash benchmarks/gpu.sh --decode --set decode_steps=32 [--set quantize=int8]
#     bash benchmarks/gpu.sh --decode --variant decode_attention=paged --variant quantize=int8 \
#       --variant decode_unroll=true --variant prefill_attention=cudnn
# (--variant: the batch-64 row again in a fresh engine with those settings, an A/B in the same invocation;
# decode_attention=paged is the Pallas kernel, never run on a GPU yet; decode_unroll with the paged pool neither;
# prefill_attention=cudnn: whole-prompt prefills with cuDNN flash attention, neither).
# --profile "$OUT/trace" also traces one batch-256 run and puts its top ops (GPU kernels) into the JSON.
#
# Usage: bash benchmarks/gpu.sh [--dry-run] [--decode] [--out FILE] [extra arguments of benchmarks.run, or of
#        benchmarks.decode_bench with --decode]
#   --dry-run   the same code paths at toy size (suite gpu-dryrun) on any device, a CPU included (tested in
#               tests/test_bench_gpu.py; `--dry-run --only peak,moe`: the moe section on qwen3-moe-dryrun, ~30 s).
#   --out FILE  JSON rows (default: $OUT/gpu-bench.json when $OUT is set, else benchmarks/gpu-latest.json).
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=gpu
MODULE=benchmarks.run
OUT_FILE=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) SUITE=gpu-dryrun; shift ;;
    --decode) MODULE=benchmarks.decode_bench; shift ;;
    --out) OUT_FILE="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [ -z "$OUT_FILE" ]; then
  if [ -n "${OUT:-}" ]; then OUT_FILE="$OUT/gpu-bench.json"; else OUT_FILE="benchmarks/gpu-latest.json"; fi
fi
PY="${PYTHON:-python3}"
WORK="${TINKER_JAX_BENCH_DIR:-/tmp/tinker-jax-bench}"
LIMIT="${BENCH_TIMEOUT_S:-480}"  # hard stop (SIGTERM -> the JSON of what was measured), below the 8 minutes

if ! "$PY" -c "import tinker.types" >/dev/null 2>&1; then
  if [ -d .whl ]; then
    echo "[gpu.sh] installing the tinker SDK and its missing needs from .whl/ into /tmp/tinker-jax-site" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tinker-jax-site \
      .whl/*.whl
    export PYTHONPATH="/tmp/tinker-jax-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu.sh] the tinker SDK is not importable and there is no .whl/ (see this script's header)" >&2
    exit 2
  fi
fi

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and jax share the chip; torch runs first and frees its cache
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# Preflight: every import the suite needs, and the versions the JSON will record (a failure here costs seconds).
"$PY" - <<'PYEOF' || { echo "[gpu.sh] preflight failed" >&2; exit 3; }
import importlib
import jax
for m in ("tinker.types", "tinker_jax.engine", "benchmarks.run", "flax", "optax", "orbax.checkpoint", "torch",
          "transformers"):
    importlib.import_module(m)
try:
    import peft
    print("[gpu.sh] peft", peft.__version__)
except ImportError as e:
    print("[gpu.sh] no peft (LoRA peer unavailable):", e)
print("[gpu.sh] jax", jax.__version__, jax.devices())
PYEOF

timeout -k 30 -s TERM "$LIMIT" "$PY" -m "$MODULE" --suite "$SUITE" --work-dir "$WORK" --out "$OUT_FILE" \
  ${EXTRA[@]+"${EXTRA[@]}"}
