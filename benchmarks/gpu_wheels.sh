#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/gpu_all.sh installs on the lent GPU machine,
# whose image has torch and transformers but not the rest, and no network: wheels for its
# Python (PY, default 3.12, manylinux x86_64) and the 2-s 1280x720 test clip the caption
# check decodes (made here with the project's ffmpeg). Carry it with `run`'s carry [".whl"]
# (64 MiB at most: this set is ~45 MB). opencv-python-headless (61 MB, imported by the model
# stages through hdvg.pipeline) does not fit beside av: the caption check needs it from the
# image.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-3.12}"
mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --no-deps --implementation cp \
  --python-version "$PY" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  av diffusers einops webdataset braceexpand open_clip_torch ftfy wcwidth \
  pytest pytest-timeout pluggy iniconfig
python3 - <<'EOF'
from pathlib import Path

from hdvg import ffmpeg

out = Path(".whl/clip720.mp4")
if not out.exists():
    ffmpeg.run(["-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25", "-t", "2",
                "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(out)],
               120, what="test clip")
EOF
du -sh .whl
ls .whl
