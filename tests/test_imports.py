"""Start-up cost: the curation driver and its Ray workers import hdvg's curation modules for
every job; torch (seconds of CPU per process) loads only where a model does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_curation_modules_do_not_import_torch():
    code = (
        "import sys, hdvg.cli, hdvg.runner, hdvg.pipeline, hdvg.stages\n"
        "from hdvg.config import load_pipeline\n"
        "from hdvg.pipeline import build_stages\n"
        f"cfg = load_pipeline({str(ROOT / 'pipelines' / 'hdvg.yaml')!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'diffusers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
