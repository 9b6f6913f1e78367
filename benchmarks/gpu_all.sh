#!/usr/bin/env bash
# Every GPU check of the project in one call on a lent H100/H200 (< 9.5 min of command). A
# session has 15 minutes of device time, start-up included: one call like this one. PLAN picks:
#   targets (default): the two issue targets --
#     1. benchmarks/gpu_caption.sh (<= 190 s): the gpu-marked model tests, then the caption
#        stage behind the CPU frame pool against the direct model loop (BLIP-2 OPT-2.7B shape),
#        with and without a core kept for the actor (models.actor_cores), issue 3; by default
#        with the static KV cache, the decode step replayed from CUDA graphs (CACHE=static);
#     2. benchmarks/gpu_compile.sh (the rest, ~370 s): the training step compiled by inductor
#        block by block (train.compile: regional; the eager path is bounded near 37 % MFU,
#        RESULTS.md), issue 7. On a 2-core CPU the base U-Net's structure compiled that way in
#        292 s, whole (train.compile: true) in 592 s (465 s in an earlier run), much of it
#        Python (dynamo, AOT autograd, inductor's lowering) that a GPU host also runs;
#   eager: 1. as above, then benchmarks/gpu_t2v.sh (<= 350 s): t2v gpu tests (the fused Triton
#     kernels on CUDA), the attention benchmark, the eager step with aten, Triton kernels, the
#     fastest attention backends and channels-last;
#   compile: 2. alone, with the whole call (TOTAL, default 565 s): the regional compile did not
#     finish in the 282 s that `targets` gave it on an H100 (2026-11-28); its cache artifacts
#     come back in $OUT and resume it at the next call (gpu_compile.sh: carry [".whl",
#     ".compile_cache"] after `bash benchmarks/gpu_compile_cache.sh FILES_AT`).
# The device image has torch and transformers; the rest travels as wheels in .whl/ (av,
# diffusers, webdataset, open_clip, ... and the 2 s 720p test clip; git-ignored; made by
# benchmarks/gpu_wheels.sh), carried with `run`'s carry [".whl"]. Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
source benchmarks/gpu_env.sh "av, diffusers, webdataset"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__)"
PLAN="${PLAN:-targets}"
if [ "$PLAN" != compile ]; then
  echo "== captions ($SECONDS s)"
  # static KV cache + CUDA graphs (caption.static_compile: cudagraphs): untimed on a GPU so far;
  # the dynamic cache measured 0.839 (RESULTS.md), CACHE=dynamic repeats that
  CACHE="${CACHE:-static}" BUDGET="${CAPTION_BUDGET:-190}" bash benchmarks/gpu_caption.sh 2>&1 \
    | tail -120
fi
if [ "$PLAN" = eager ]; then
  echo "== t2v eager ($SECONDS s)"
  BUDGET="${T2V_BUDGET:-350}" bash benchmarks/gpu_t2v.sh 2>&1 | tail -80
else
  echo "== t2v compiled ($SECONDS s)"
  BUDGET=$((${TOTAL:-565} - SECONDS)) bash benchmarks/gpu_compile.sh 2>&1 | tail -120
fi
echo "== done (${SECONDS}s)"
