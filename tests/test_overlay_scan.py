"""The static-overlay detector before the cut, on the scene pass's own thumbnails: the same
moving clips with and without a burned-in channel name / corner logo (ffmpeg drawtext and
overlay at test time), a static shot, a letterboxed picture."""

from __future__ import annotations

import pytest
from test_model_frames import make_overlay_media  # tests/ is on sys.path (rootdir conftest)

from hdvg.config import ScenesConfig
from hdvg.probe import probe
from hdvg.records import Clip
from hdvg.scenes import detect_scenes
from hdvg.stages import build_stage


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_overlay_media(tmp_path_factory.mktemp("scan"))


def _scan(path, **params) -> Clip:
    pr = probe(path)
    res = detect_scenes(str(path), pr, ScenesConfig(detector="none"), gray=True)
    sp = res.spans[0]
    clip = Clip("x_0000", "x", str(path), 0, sp.start_s, sp.end_s, sp.start_frame, sp.end_frame,
                sp.end_s - sp.start_s, pr.width, pr.height, pr.fps)  # fmt: skip
    clip.samples = [s for s in res.samples if sp.start_frame <= s.frame_index < sp.end_frame]
    assert sum(s.gray is not None for s in clip.samples) >= 8
    st = build_stage("overlay", params)
    st.process_batch([clip], [None])
    return clip


def _inside(c: Clip, region) -> bool:
    x, y, w, h = (c.scores[k] for k in ("overlay_x", "overlay_y", "overlay_w", "overlay_h"))
    x0, y0, x1, y1 = region
    return x >= x0 and y >= y0 and x + w <= x1 and y + h <= y1


def test_channel_name_flagged_with_box(files):
    c = _scan(files["channel"])
    assert c.status == "rejected" and c.reason == "watermark", c.scores
    assert _inside(c, (440, 5, 640, 70)), c.scores


def test_corner_logo_flagged_with_box(files):
    c = _scan(files["logo"])
    assert c.reason == "watermark", c.scores
    assert _inside(c, (5, 360 - 16 - 40 - 12, 16 + 64 + 12, 355)), c.scores


def test_clean_static_and_letterbox_not_flagged(files):
    for name in ("clean", "static", "letterbox"):
        c = _scan(files[name])
        assert c.status == "accepted", (name, c.scores)
        assert c.scores["overlay_x"] is None, (name, c.scores)


def test_thumbnails_stay_bounded_for_long_shots():
    import numpy as np

    from hdvg.scenes import GrayReservoir

    r = GrayReservoir(25.0, per_minute=12)
    frame = np.zeros((27, 48, 3), np.uint8)
    for i in range(25 * 600):  # a 10-minute shot without a cut
        if i % r.base == 0:
            r.offer(i, frame[..., 0])
    kept = r.finish()
    assert 120 <= len(kept) <= 240  # 12 to 24 per minute, evenly spread
    idx = [i for i, _ in kept]
    gaps = np.diff(idx)
    assert gaps.max() == gaps.min()
