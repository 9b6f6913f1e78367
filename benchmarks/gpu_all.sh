#!/usr/bin/env bash
# Every GPU check of the project in one call on a lent H100/H200 (< 9 min): the caption
# stage behind the CPU frame pool against the direct model loop (BLIP-2 OPT-2.7B shape),
# then benchmarks/gpu_t2v.sh (t2v gpu tests and the training-step benchmark). The device
# image has torch and transformers; the rest travels as wheels in .whl/ (see
# benchmarks/RESULTS.md for how).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__)"
CLIP=""; [ -f .whl/clip720.mp4 ] && CLIP="--clip .whl/clip720.mp4"
timeout 200 python3 benchmarks/bench_caption.py --shape opt-2.7b --clips 1536 --batch-sizes 64,128 \
  --tokens 30 --size 1280x720 --pipeline both --decode-threads 12 $CLIP \
  --out "$OUT/models_bench.json" 2>&1 | grep -v Warning | tail -30 || echo "caption bench rc=$?"
BUDGET="${BUDGET:-230}" bash benchmarks/gpu_t2v.sh
echo "== captions"; cat "$OUT/models_bench.json" 2>/dev/null
echo "== t2v"; cat "$OUT/t2v_bench.json" 2>/dev/null
