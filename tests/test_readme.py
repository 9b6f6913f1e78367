"""The README's two commands: the demo curation runs from the checkout (CI's fresh clone)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    cmds = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert cmds == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_demo_command(tmp_path):
    out = tmp_path / "demo_out"
    r = subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rejected by reason" in r.stderr and "stage seconds" in r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["clips_by_status"]["accepted"] >= 4
    assert set(run["counts"]["clips_rejected_by_reason"]) >= {"resolution", "aspect", "letterbox"}
    assert run["counts"]["sources_failed_by_reason"] == {"not_video": 1}
    assert list((out / "shards").glob("shard-*.tar"))
