#!/usr/bin/env bash
# The README demo: make a few sources with ffmpeg (HD, SD, 4:3, letterboxed, a non-video)
# and curate them with pipelines/smoke.yaml on an embedded local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-out/demo}
python3 -m hdvg.media demo/sources
python3 -m hdvg curate pipelines/smoke.yaml --input demo/sources --output "$OUT"
echo
echo "shards:    $OUT/shards"
echo "manifests: $OUT/manifest/{clips,sources}/*.parquet"
echo "try:       hdvg manifest query $OUT \"select status, reason, count(*) from clips group by all\""
