#!/usr/bin/env bash
# One-time (idempotent) setup on a fresh machine: the package with every extra, and the
# system tools the tests use. ffmpeg comes from the imageio-ffmpeg wheel; nothing else
# is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import hdvg, ray, scenedetect, av, torch, webdataset, duckdb, open_clip, diffusers, yt_dlp, imageio_ffmpeg, ruff, aiohttp" >/dev/null 2>&1 \
   || [ "${HDVG_REINSTALL:-0}" = 1 ]; then
  echo "[setup] pip install -e .[dev]"
  $PY -m pip install -q --disable-pip-version-check -e ".[dev]"
else
  # keep the editable install pointing at this checkout (CI clones elsewhere)
  $PY -m pip install -q --disable-pip-version-check --no-deps -e . >/dev/null
fi

# Headless Chromium for the report test (Debian package; skipped when not root / no apt).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && [ "${HDVG_SKIP_BROWSER:-0}" != 1 ]; then
  echo "[setup] apt-get install chromium"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
     >/dev/null) || echo "[setup] chromium not installed; browser tests will be skipped"
fi
