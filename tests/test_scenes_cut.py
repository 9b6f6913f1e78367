"""Scene split and cut on media with known cuts (pure functions, no Ray)."""

from __future__ import annotations

import io

import av
import pytest

from hdvg.config import CutConfig, ScenesConfig
from hdvg.cut import cut_clip, plan_cut
from hdvg.probe import probe
from hdvg.scenes import detect_scenes


def _frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.parametrize("name", ["hd1080.mp4", "hd720.mp4", "nokey720.mp4", "late.ts"])
@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_cuts_within_one_frame(media_dir, name, detector):
    m = media_dir[name]
    cfg = ScenesConfig(detector=detector)
    res = detect_scenes(str(m.path), probe(m.path), cfg)
    truth = m.spec.cut_frames()
    assert len(res.cuts) == len(truth), (res.cuts, truth)
    for got, want in zip(res.cuts, truth, strict=False):
        assert abs(got - want) <= 1
    # spans tile the video and none crosses a true cut
    assert res.spans[0].start_frame == 0 and res.spans[-1].end_frame == m.spec.n_frames
    for sp in res.spans:
        assert not any(sp.start_frame < c < sp.end_frame for c in truth)


def test_histogram_detector_selectable(media_dir):
    m = media_dir["hd720.mp4"]
    res = detect_scenes(str(m.path), probe(m.path), ScenesConfig(detector="histogram"))
    assert res.cuts and abs(res.cuts[0] - m.spec.cut_frames()[0]) <= 1


def test_vfr_cut_time_is_exact(media_dir):
    m = media_dir["vfr.mp4"]
    pr = probe(m.path)
    assert pr.vfr
    res = detect_scenes(str(m.path), pr, ScenesConfig())
    assert res.cuts == [90]  # 90 frames at 30 fps, then 10 fps
    assert res.spans[1].start_s == pytest.approx(3.0, abs=1e-3)
    # a constant-rate assumption at the average fps would put the cut near 90/avg_fps
    assert abs(90 / pr.fps - 3.0) > 0.5


def test_late_start_times_are_relative_to_first_frame(media_dir):
    m = media_dir["late.ts"]
    pr = probe(m.path)
    assert pr.start_time_s > 5
    res = detect_scenes(str(m.path), pr, ScenesConfig())
    assert res.spans[0].start_s == 0.0
    assert res.spans[1].start_s == pytest.approx(2.5, abs=0.041)
    # the cut lands exactly on the shot: cutting by our times gives the shot's frames
    plan = plan_cut(res.spans[1], res, CutConfig(mode="reencode", preset="ultrafast"))
    data = cut_clip(str(m.path), plan, res, CutConfig(mode="reencode", preset="ultrafast"), "/tmp")
    assert _frames(data) == res.spans[1].end_frame - res.spans[1].start_frame


def test_max_clip_length_splits_long_scenes(media_dir):
    m = media_dir["hd1080.mp4"]
    res = detect_scenes(str(m.path), probe(m.path), ScenesConfig(max_clip_s=1.0))
    assert all(sp.end_s - sp.start_s <= 1.0 + 1e-6 for sp in res.spans)
    truth = m.spec.cut_frames()
    assert {sp.start_frame for sp in res.spans} >= set(truth)


def test_copy_at_keyframes_reencode_elsewhere(media_dir, tmp_path):
    cfg = CutConfig(preset="ultrafast")
    keyed = media_dir["hd720.mp4"]
    res = detect_scenes(str(keyed.path), probe(keyed.path), ScenesConfig())
    plans = [plan_cut(sp, res, cfg) for sp in res.spans]
    assert [p.method for p in plans] == ["copy", "copy"]
    nokey = media_dir["nokey720.mp4"]
    res2 = detect_scenes(str(nokey.path), probe(nokey.path), ScenesConfig())
    plans2 = [plan_cut(sp, res2, cfg) for sp in res2.spans]
    assert [p.method for p in plans2] == ["copy", "reencode"]
    for plan, sp in zip(plans + plans2, res.spans + res2.spans, strict=False):
        src = keyed.path if plan in plans else nokey.path
        r = res if plan in plans else res2
        data = cut_clip(str(src), plan, r, cfg, str(tmp_path))
        assert _frames(data) == sp.end_frame - sp.start_frame
    always = CutConfig(mode="reencode", preset="ultrafast", fps=10, short_side=360)
    p = plan_cut(res.spans[0], res, always)
    assert p.method == "reencode"
    data = cut_clip(str(keyed.path), p, res, always, str(tmp_path))
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (640, 360)
        n = sum(1 for _ in c.decode(s))
    assert n == round((res.spans[0].end_s - res.spans[0].start_s) * 10)


def test_copies_of_a_source_are_one_remux_pass_with_identical_bytes(media_dir, tmp_path):
    """All stream copies of a source come from one pass over its packets (no ffmpeg
    process), byte-identical to the clips cut one by one and to a second run."""
    from hdvg import ffmpeg
    from hdvg.config import PipelineConfig
    from hdvg.cut import remux_clips
    from hdvg.pipeline import SourceProcessor
    from hdvg.records import Clip

    cfg = CutConfig(preset="ultrafast")
    m = media_dir["hd720.mp4"]
    pr = probe(m.path)
    res = detect_scenes(str(m.path), pr, ScenesConfig())
    plans = [plan_cut(sp, res, cfg, pr) for sp in res.spans]
    assert [p.method for p in plans] == ["copy", "copy"]
    one = [cut_clip(str(m.path), p, res, cfg, str(tmp_path)) for p in plans]
    assert remux_clips(str(m.path), plans, res, cfg, str(tmp_path)) == one
    assert [_frames(d) for d in one] == [sp.end_frame - sp.start_frame for sp in res.spans]

    calls = []
    proc = SourceProcessor(PipelineConfig(), str(tmp_path / "out"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ffmpeg, "run", lambda *a, **k: calls.append(a))
        clips = [Clip(f"c{i}", "s", "u", i, 0, 1, 0, 1, 1, 1280, 720, 25.0) for i in range(2)]
        proc._cut_all(m.path, clips, plans, res, pr)
    assert not calls and [c.data for c in clips] == one
    assert all(c.cut_method is None and c.status != "failed" for c in clips)


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_fast_frame_score_equals_pyscenedetect(media_dir, detector):
    """Our two-pass HSV score gives PySceneDetect's own frame scores and cuts, bit for bit."""
    import scenedetect
    from scenedetect.common import FrameTimecode

    from hdvg.ffmpeg import FrameReader
    from hdvg.scenes import frame_size, make_detector

    m = media_dir["hd720.mp4"]
    pr = probe(m.path)
    cfg = ScenesConfig(detector=detector)
    ours = make_detector(cfg)
    stock_cls = {"adaptive": scenedetect.AdaptiveDetector, "content": scenedetect.ContentDetector}
    params = cfg.adaptive if detector == "adaptive" else cfg.content
    stock = stock_cls[detector](min_scene_len=cfg.min_scene_frames, **params)
    assert type(ours) is not type(stock) and isinstance(ours, type(stock))
    reader = FrameReader(str(m.path), *frame_size(pr, cfg.frame_width), timeout_s=60, stall_s=30)
    scores, cuts = [], {"ours": [], "stock": []}
    for i, frame in enumerate(reader):
        for name, det in (("ours", ours), ("stock", stock)):
            cuts[name] += [
                tc.frame_num for tc in det.process_frame(FrameTimecode(i, pr.fps), frame)
            ]
        scores.append((ours._frame_score, stock._frame_score))
    assert len(scores) == m.spec.n_frames
    assert all(a == b for a, b in scores), [s for s in scores if s[0] != s[1]][:3]
    assert any(a and a > 10 for a, _ in scores)  # the cuts score high: a real comparison
    assert cuts["ours"] == cuts["stock"] and cuts["ours"]
