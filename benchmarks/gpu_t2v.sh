#!/usr/bin/env bash
# t2v GPU check, <= 350 s on one H100: gpu-marked tests, every attention call of the step under
# each SDPA backend, then the training step at the paper-like size (16x256x256 -> latent
# 16x32x32, SD-2.x widths, bf16 autocast, AdamW), batch 4:
#   A. eager, NCHW (the baseline: 0.454 s/step, 14.2 % MFU last time), then the same with the
#      norms and GEGLU in the fused Triton kernels (--kernels triton), then that with each
#      attention kind on its fastest backend (when one is not flash), then the Triton kernels
#      with channels-last (eager channels-last was slower only for CUDA's group norm copying
#      NHWC to NCHW and back; the Triton norms read and write NHWC in place), as time allows
#   C. channels-last + regional torch.compile (each block compiled apart; compile_s reported)
#   B. (last) channels-last + only the norms compiled
#   (C and B only run when their compile budget is left: not at the default budget)
# Each run also profiles 2 steps: GPU ms by kernel kind (conv/gemm/attention/norm/layout/...)
# in the JSON, full kernel tables in $OUT/t2v_profile_<run>.hdvg.txt.
# Every run has its own `timeout` and writes each row to $OUT/t2v_bench.json as it is measured,
# so a timeout or an OOM loses only that run. Needs only the repo and `pip install -e .[dev]`.
# Not run here: benchmarks/t2v_traffic.py (the step's non-matmul bytes) uses fake tensors and
# gives the same figure on any CPU host; compare its before/after with this script's step time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
BUDGET="${BUDGET:-350}"  # seconds for the whole script
mkdir -p "$OUT"
JSON="$OUT/t2v_bench.json"
rm -f "$JSON"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
source benchmarks/gpu_env.sh "av, diffusers, webdataset"
BENCH="python benchmarks/bench_t2v.py model --json $JSON --batch 4"

# 1. gpu tests: bf16 equivalence with diffusers on the device, the fused Triton kernels against
#    aten (test_kernels.py runs its cases on CUDA tensors there: ~60 compiles of the kernels'
#    test tile shapes; the training run skips without ffmpeg). The sm_90 build check is left
#    out: it compiles with Triton's ptxas and gives the same answer on any host; so is the
#    inductor test of the kernel's custom ops (a cold CUDA compile: gpu_compile.sh covers it)
timeout 110 python -m pytest tests/t2v/test_gpu.py tests/t2v/test_kernels.py -q -p no:cacheprovider \
  -k "not build_for_an_h100 and not compiled" 2>&1 | tail -8 | tee "$OUT/t2v_gpu_tests.txt"

# 1b. the EMA update of the base U-Net (~1,500 tensors) against a per-tensor loop and a bare
#     multi-tensor lerp (~15 s)
timeout 30 python benchmarks/bench_t2v.py ema --json "$OUT/t2v_ema.json" 2>&1 | tail -1 \
  || echo "ema bench failed or timed out: rc=$?"

# 2. every attention call of the step under each SDPA backend (~30 s): per kind the fastest, as a
#    --attention-backends value (empty when flash wins everywhere)
timeout 45 python benchmarks/bench_attention.py --batch 4 --json "$OUT/t2v_attention.json" \
  2>&1 | tail -3 || echo "attention bench failed or timed out: rc=$?"
ATTN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['attention_backends'])" \
  "$OUT/t2v_attention.json" 2>/dev/null)
echo "attention backends: ${ATTN:-flash everywhere}"

# 3. A: eager NCHW, profiled (~35 s: start-up, FLOP count, cuDNN autotune in warm-up, 6+2 steps)
timeout 50 $BENCH --steps 6 --warmup 2 --profile "$OUT/t2v_profile_eager" \
  || echo "eager bench failed or timed out: rc=$?"

# 3b. A with the norms and GEGLU in the fused Triton kernels (train.kernels: triton), profiled:
#     the same step with under half the non-matmul bytes (t2v_traffic.py: 332.9 -> 152.1 GB)
# 120 s: the aten run takes ~40 s, and the first Triton step builds every kernel at every shape
# (60 s did not cover the warm-up on an H100, 2026-11-28)
timeout 120 $BENCH --steps 6 --warmup 2 --kernels triton --profile "$OUT/t2v_profile_triton" \
  || echo "triton-kernels bench failed or timed out: rc=$?"

# 3c. 3b with each attention kind on its fastest backend (step 2), when one is not flash
if [ -n "$ATTN" ]; then
  timeout 60 $BENCH --steps 6 --warmup 2 --kernels triton --attention-backends "$ATTN" \
    --profile "$OUT/t2v_profile_triton_attn" || echo "triton + attention bench failed: rc=$?"
fi

# 3d. channels-last + the Triton kernels, eager, profiled. t2v_traffic.py --channels-last: 178.2 GB
#     of non-matmul traffic (NCHW: 164.5), the difference copies cuDNN's backward would make of
#     strided gradients; NCHW's own transposes inside cuDNN are not seen there: timed here
if [ $((BUDGET - SECONDS)) -gt 60 ]; then
  timeout 60 $BENCH --steps 6 --warmup 2 --kernels triton --channels-last \
    --profile "$OUT/t2v_profile_cl_triton" || echo "channels-last triton bench failed: rc=$?"
fi

# 4. C: channels-last + regional compile, with all that is left but B's 90 s (34 graphs;
#    compile_s apart). Before B: the larger possible gain, and the one that needs the time.
left=$((BUDGET - SECONDS - 90))
if [ "$left" -gt 60 ]; then
  timeout "$left" $BENCH --steps 5 --warmup 1 --channels-last --compile regional \
    --compile-timeout $((left - 35)) --profile "$OUT/t2v_profile_cl_regional" \
    || echo "regional compile bench failed or timed out: rc=$?"
else
  echo "skipping regional compile: ${left}s left of ${BUDGET}s"
fi

# 5. B: channels-last + compiled norms, profiled (~60 s: ~15-20 small graphs, one per norm
#    rank / channel count / layout, dynamic otherwise)
left=$((BUDGET - SECONDS - 3))
if [ "$left" -gt 80 ]; then  # less leaves no time to compile: the slot is not worth spending
  timeout "$((left < 88 ? left : 88))" $BENCH --steps 6 --warmup 2 --channels-last \
    --compile norms --compile-timeout $((left < 88 ? left - 30 : 58)) \
    --profile "$OUT/t2v_profile_cl_norms" \
    || echo "channels-last + norms bench failed or timed out: rc=$?"
else
  echo "skipping channels-last + norms: ${left}s left of ${BUDGET}s"
fi

echo "results: $JSON (${SECONDS}s)"
cat "$JSON" 2>/dev/null
