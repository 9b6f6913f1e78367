#!/usr/bin/env bash
# Every GPU check of the project in one call on a lent H100/H200 (< 9.5 min of command):
#   1. benchmarks/gpu_t2v.sh (<= 350 s): t2v gpu tests (the fused Triton kernels on CUDA
#      included), the attention calls under each SDPA backend, and the training step: eager
#      aten, eager with --kernels triton (+ the fastest attention backends; NCHW, then
#      channels-last), then channels-last + compile as time allows, issue 7;
#   2. benchmarks/gpu_caption.sh (<= 190 s): the gpu-marked model tests, then the caption stage
#      behind the CPU frame pool against the direct model loop (BLIP-2 OPT-2.7B shape), issue 3.
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
echo "== t2v ($SECONDS s)"
BUDGET="${T2V_BUDGET:-350}" bash benchmarks/gpu_t2v.sh 2>&1 | tail -80
echo "== captions ($SECONDS s)"
BUDGET="${CAPTION_BUDGET:-190}" bash benchmarks/gpu_caption.sh 2>&1 | tail -60
echo "== done (${SECONDS}s)"
