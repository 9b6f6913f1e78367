#!/usr/bin/env bash
# GPU check of the model stages (< 3 minutes on one H100): the gpu-marked model tests, then
# the caption benchmark at BLIP-2 OPT-2.7B shape (random bf16 weights, 30 fixed tokens),
# pipeline stage vs the direct generate loop. Writes $OUT/models_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 120 python -m pytest -q -m gpu tests/test_model_gpu.py 2>&1 | tail -5 | tee "$OUT/models_gpu_tests.txt"
timeout 150 python benchmarks/bench_caption.py --shape opt-2.7b --clips 768 \
  --batch-sizes 64,128 --tokens 30 --size 1280x720 --decode-threads 12 \
  --out "$OUT/models_bench.json"
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
res = json.loads((out / "models_bench.json").read_text())
res["gpu_tests"] = (out / "models_gpu_tests.txt").read_text().strip().splitlines()[-1:]
(out / "models_bench.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
PY
