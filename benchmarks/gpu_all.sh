#!/usr/bin/env bash
# Every GPU check of the project in one call on a lent H100/H200 (< 9.5 min): the t2v gpu tests,
# the t2v training-step benchmark (eager + torch.compile, diffusers' UNet3D as the baseline) and
# the BLIP-2-shaped caption benchmark (stage vs direct loop). The device image has torch and
# transformers; the rest travels as wheels in .whl/ (see benchmarks/RESULTS.md for how).
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
python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__)"
timeout 90 python3 -m pytest tests/t2v/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/t2v_gpu_tests.txt"
timeout 150 python3 benchmarks/bench_t2v.py model --batch 2 8 --steps 10 --warmup 3 --baseline \
  --json "$OUT/t2v_bench.json" 2>&1 | tail -25 || echo "eager t2v bench rc=$?"
timeout 140 python3 benchmarks/bench_t2v.py model --batch 8 --steps 10 --warmup 2 --compile \
  --json "$OUT/t2v_bench.json" 2>&1 | tail -25 || echo "compiled t2v bench rc=$?"
CLIP=""; [ -f .whl/clip720.mp4 ] && CLIP="--clip .whl/clip720.mp4"
timeout 150 python3 benchmarks/bench_caption.py --shape opt-2.7b --clips 768 --batch-sizes 64,128 \
  --tokens 30 --size 1280x720 --decode-threads 12 $CLIP --out "$OUT/models_bench.json" 2>&1 | tail -25 \
  || echo "caption bench rc=$?"
echo "== t2v"; cat "$OUT/t2v_bench.json" 2>/dev/null
echo "== captions"; cat "$OUT/models_bench.json" 2>/dev/null
