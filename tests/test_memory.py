"""Bounded memory: clip bytes stream through the driver one shard at a time (spooled to
disk until the shard closes), so the driver's peak Python memory stays flat as the number
of sources grows. Measured with tracemalloc on a real run over the session's local Ray."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

from hdvg import media
from hdvg.config import load_pipeline
from hdvg.media import VideoSpec

ROOT = Path(__file__).resolve().parents[1]


def _peak(src: Path, out: Path) -> tuple[int, int]:
    from hdvg.runner import curate

    cfg = load_pipeline(ROOT / "pipelines" / "smoke.yaml", {"shards": {"max_samples": 4}})
    tracemalloc.start()
    try:
        summary = curate(cfg, str(src), out, quiet=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, summary["counts"]["clips_by_status"].get("accepted", 0)


def test_driver_memory_flat_in_source_count(ray_local, tmp_path):
    base = media.make_video(tmp_path / "base.mp4", VideoSpec(1280, 720, 25, (2.5, 2.5)))
    clip_mb = base.stat().st_size / 2**20
    peaks = {}
    for n in (2, 8):
        src = tmp_path / f"src{n}"
        src.mkdir()
        for i in range(n):  # distinct paths: distinct sources with the same work
            shutil.copy(base, src / f"s{i:03d}.mp4")
        peaks[n], accepted = _peak(src, tmp_path / f"out{n}")
        assert accepted == 2 * n
    # 4x the sources (and 4x the clip bytes through the driver) must not raise the peak by
    # more than a couple of sources' worth; a driver holding every clip would add ~6x clip_mb
    growth_mb = (peaks[8] - peaks[2]) / 2**20
    assert growth_mb < max(2.0, 2 * clip_mb), (peaks, clip_mb)
