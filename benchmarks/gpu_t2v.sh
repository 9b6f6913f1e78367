#!/usr/bin/env bash
# t2v GPU check, < 4 min on one H100: gpu-marked tests, then the training-step benchmark at the
# paper-like size (16x256x256 -> latent 16x32x32, SD-2.x widths, bf16, AdamW).
# Needs only the repo and `pip install -e .[dev]`. Results: $OUT/t2v_bench.json (default ./bench_out).
# Saved activations per sample (benchmarks/t2v_memory.py, fake-CUDA count): 6.7 GiB eager
# (diffusers' UNet3D: 10.8; this U-Net before: 11.8), 1.9 GiB with `--ckpt attention`, on top of
# ~24 GiB of fp32 weights + grads + AdamW state + bf16 weight casts: eager fits batch ~8 on 80 GB.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
BUDGET="${BUDGET:-230}"  # seconds for the whole script
mkdir -p "$OUT"
JSON="$OUT/t2v_bench.json"
rm -f "$JSON"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH="python benchmarks/bench_t2v.py model --json $JSON"

# 1. gpu tests: bf16 equivalence with diffusers on the device, a short training run (~30 s)
timeout 45 python -m pytest tests/t2v -m gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/t2v_gpu_tests.txt"

# 2. eager bf16: batch 4 and 8 (a sweep stops at its first OOM), diffusers' UNet3D at 8 (~50 s)
timeout 75 $BENCH --batch 4 8 --steps 8 --warmup 2 --baseline --baseline-batch 8 \
  || echo "eager model bench failed or timed out: rc=$?"

# 3. larger batches: recompute only the attention blocks (most of the saved bytes) (~60 s)
timeout 70 $BENCH --batch 8 12 16 --steps 6 --warmup 2 --ckpt attention \
  || echo "selective-checkpointing bench failed or timed out: rc=$?"

# 4. torch.compile at batch 4 with what is left of the budget; compile time reported as compile_s
left=$((BUDGET - SECONDS))
if [ "$left" -gt 60 ]; then
  timeout "$left" $BENCH --batch 4 --steps 6 --warmup 1 --compile --compile-timeout $((left - 30)) \
    || echo "compiled model bench failed or timed out: rc=$?"
else
  echo "skipping torch.compile: ${left}s left of ${BUDGET}s"
fi

echo "results: $JSON (${SECONDS}s)"
cat "$JSON" 2>/dev/null
