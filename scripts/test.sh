#!/usr/bin/env bash
# The README test command (CI runs exactly this): set up, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check hdvg tests benchmarks
python3 -m pytest -q "$@"
