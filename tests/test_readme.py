"""The README's two commands: the demo curation runs from the checkout (CI's fresh clone)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    cmds = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert cmds == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _ray_processes() -> dict[int, str]:
    """Ray's processes on this machine (GCS, raylet, monitor, dashboard, workers, ...)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "site-packages/ray/" in cmd or "ray::" in cmd:
            found[p.pid] = cmd
    return found


def test_demo_command(tmp_path):
    out = tmp_path / "demo_out"
    before = _ray_processes()
    r = subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    # the embedded Ray it started is gone with it (ours, the test session's, may be running)
    mine = {c.pid for c in psutil.Process().children(recursive=True)}
    deadline = time.monotonic() + 5
    while (left := set(_ray_processes()) - set(before) - mine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [_ray_processes().get(pid) for pid in left]
    assert "rejected by reason" in r.stderr and "stage seconds" in r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["clips_by_status"]["accepted"] >= 4
    assert set(run["counts"]["clips_rejected_by_reason"]) >= {"resolution", "aspect", "letterbox"}
    assert run["counts"]["sources_failed_by_reason"] == {"not_video": 1}
    assert list((out / "shards").glob("shard-*.tar"))
