#!/usr/bin/env bash
# One GPU run of fp8fx's CUDA checks and benchmarks, under 8 minutes in all.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Steps, each with its own `timeout` (seconds; override by environment variable), all output
# in OUT_DIR (created):
#   machine   nvidia-smi, torch / CUDA / capability, package versions    -> machine.txt
#   tests     pytest -k cuda (fake-tensor CUDA-path tests + real-GPU tests, which
#             skip without CUDA; the Linear and the attention lowerings) T_TESTS=90 -> tests.log, tests.xml
#   attention benchmarks/attention_cuda.py: the lowered fp8fx::matmul (_scaled_grouped_mm, sm90)
#             against its emulation and bf16, Llama-3-8B Q·Kᵀ / P·V, prefill and decode
#                                                               T_ATTN=50     -> attention.jsonl
#   schemes   benchmarks/linear_schemes_cuda.py: FP8_DYNAMIC and FP8_BLOCK (compiled) against bf16
#             on Llama-3-8B Linear shapes, M = 1,16,256,2048  T_SCHEMES=90 -> schemes.jsonl
#   linear    benchmarks/linear.py --device cuda, Llama-3-8B then Llama-3-70B Linear shapes,
#             M = 1,16,256,2048,8192               T_LINEAR=80, T_LINEAR70=70 -> linear_*.jsonl
#   model     benchmarks/model.py --device cuda --llama8b (random weights, LAYERS=4 layers),
#             prefill + decode                              T_MODEL=140   -> model.log, model.jsonl
#   summary   benchmarks/gpu_summary.py OUT_DIR                           -> summary.md, summary.json
# A deadline (DEADLINE=450 s from the start) caps every step's timeout, so the whole stays under
# 8 minutes. Without a CUDA device it runs the (skipping) tests and exits 0.
set -u
OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
T_TESTS=${T_TESTS:-90}
T_ATTN=${T_ATTN:-50}
T_SCHEMES=${T_SCHEMES:-90}
T_LINEAR=${T_LINEAR:-80}
T_LINEAR70=${T_LINEAR70:-70}
T_MODEL=${T_MODEL:-140}
DEADLINE=${DEADLINE:-450}
LAYERS=${LAYERS:-4}
START=$SECONDS
export PYTHONUNBUFFERED=1

budget() {  # the step's own budget, capped by what is left before the deadline
  local left=$((DEADLINE - (SECONDS - START) - 15))
  ((left < 1)) && left=1
  echo $(($1 < left ? $1 : left))
}

step() {  # step NAME BUDGET LOG CMD...: run under timeout, log, record rc and seconds
  local name=$1 t log=$3; t=$(budget "$2"); shift 3
  echo "== $name (timeout ${t}s): $*"
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" >"$log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timeout_s\": $t, \"timed_out\": $([[ $rc == 124 || $rc == 137 ]] && echo true || echo false)}" >>"$OUT/steps.jsonl"
  echo "   rc=$rc after $((SECONDS - t0))s; log: $log"
  tail -n 3 "$log" | sed 's/^/   | /'
}

: >"$OUT/steps.jsonl"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+local changes)')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, os, platform, torch
print("python", platform.python_version(), "| cpus", len(os.sched_getaffinity(0)))
print("torch", torch.__version__, "| cuda build", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability", ".".join(map(str, torch.cuda.get_device_capability(0))),
          "| memory GiB", round(p.total_memory / 2**30, 1), "| SMs", p.multi_processor_count)
for name in ("transformers", "triton", "torchao"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
EOF
} 2>&1 | grep -v "Warning\|Failed to load\|_pytree" | tee "$OUT/machine.txt"

HAS_CUDA=$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# -k cuda: every test in test_cuda_paths.py and test_cuda_attention.py (all marked `cuda`: the
# fp8fx::linear and the schemes' fp8fx::scaled_linear CUDA paths, the attention lowering) and the
# fake-tensor CUDA tests of test_backend_inductor.py (named *cuda*)
step tests "$T_TESTS" "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda \
  --junitxml "$OUT/tests.xml" tests/test_cuda_paths.py tests/test_cuda_attention.py tests/test_backend_inductor.py

if [[ $HAS_CUDA != 1 ]]; then
  echo "no CUDA device: skipping the GPU benchmarks"
  exit 0
fi

# the attention matmuls first (no figures yet), then the schemes: a timeout cuts the older ones
step attention "$T_ATTN" "$OUT/attention.log" "$PY" benchmarks/attention_cuda.py --device cuda \
  --warmup 3 --repeats 20 --json-out "$OUT/attention.jsonl"

step schemes "$T_SCHEMES" "$OUT/schemes.log" "$PY" benchmarks/linear_schemes_cuda.py --device cuda \
  --shapes llama --m 1,16,256,2048 --warmup 3 --repeats 20 --json-out "$OUT/schemes.jsonl"

LINEAR_ARGS=(--device cuda --m 1,16,256,2048,8192 --warmup 1 --repeats 10 --budget 0.05
  --quiet-wait 0 --retries 0 --no-table
  --candidates bf16,bf16_compiled,reference,inductor_op,scaled_mm,raw_scaled_mm,torchao_f8dyn_perrow,torchao_f8dyn_pertensor)
step linear_llama8b "$T_LINEAR" "$OUT/linear_llama8b.log" "$PY" benchmarks/linear.py \
  --shapes llama "${LINEAR_ARGS[@]}" --json-out "$OUT/linear_llama8b.jsonl"
step linear_llama70b "$T_LINEAR70" "$OUT/linear_llama70b.log" "$PY" benchmarks/linear.py \
  --shapes llama70b "${LINEAR_ARGS[@]}" --json-out "$OUT/linear_llama70b.jsonl"

# most important first: a timeout loses the variants at the end of the list
step model "$T_MODEL" "$OUT/model.log" "$PY" benchmarks/model.py --device cuda --llama8b \
  --layers "$LAYERS" --batch 1 --prefill-len 1024 --decode-tokens 16 --repeats 3 --rounds 1 \
  --variants bf16_eager,bf16_compiled,fp8fx_compiled,raw_scaled_mm,torchao_perrow,torchao_perrow_compiled,fp8fx_backend,fp8fx_eager \
  --json "$OUT/model.jsonl"

timeout 30 "$PY" benchmarks/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.md"
echo "total $((SECONDS - START))s; results in $OUT"
exit 0
