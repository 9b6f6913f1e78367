#!/usr/bin/env bash
# t2v GPU check, < 4 min on one H100: gpu-marked tests, then the training-step benchmark at the
# paper-like size (16x256x256 -> latent 16x32x32, SD-2.x widths, bf16) and the CPU loader.
# Needs only the repo and `pip install -e .[dev]`. Results: $OUT/t2v_bench.json (default ./bench_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
JSON="$OUT/t2v_bench.json"
rm -f "$JSON"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. gpu tests (~30 s)
timeout 120 python -m pytest tests/t2v -m gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/t2v_gpu_tests.txt"

# 2. eager bf16: hdvg U-Net at batch 2 and 8, diffusers' UNet3D at batch 2 for comparison (~60 s)
timeout 150 python benchmarks/bench_t2v.py model --batch 2 8 --steps 10 --warmup 3 --baseline --json "$JSON" \
  || echo "eager model bench failed or timed out: rc=$?"

# 3. torch.compile at batch 8 (compile time is reported as warmup_s) (~90 s)
timeout 170 python benchmarks/bench_t2v.py model --batch 8 --steps 10 --warmup 2 --compile --json "$JSON" \
  || echo "compiled model bench failed or timed out: rc=$?"

# 4. loader throughput on this machine's CPU (~20 s)
timeout 90 python benchmarks/bench_t2v.py loader --clips 16 --json "$JSON" \
  || echo "loader bench failed or timed out: rc=$?"

echo "results: $JSON"
cat "$JSON" 2>/dev/null
