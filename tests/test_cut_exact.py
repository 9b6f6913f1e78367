"""Cuts hold exactly their scene's frames, upright and with square pixels, whatever the
source's encoding: B-frames (stream copies used to pick up frames of the neighbouring
shots), Matroska (its seek lands a GOP early), MPEG-TS (its seek lands a GOP late), display
rotation, anamorphic pixels and odd sizes. Media made with ffmpeg here; every clip is
compared frame by frame with a full decode of its source."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from hdvg import ffmpeg
from hdvg.config import CutConfig, PipelineConfig, ScenesConfig
from hdvg.cut import plan_cut
from hdvg.media import VideoSpec, make_video
from hdvg.pipeline import SourceProcessor
from hdvg.probe import probe
from hdvg.records import Clip
from hdvg.scenes import detect_scenes

CUT = CutConfig(preset="ultrafast", crf=12)


def gray(src: Path | bytes) -> list[np.ndarray]:
    """Every frame of a file or clip as stored, as gray pixels."""
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as c:
        return [f.to_ndarray(format="gray") for f in c.decode(video=0)]


def displayed(src: Path, size: tuple[int, int]) -> list[np.ndarray]:
    """Every frame as a player shows it (ffmpeg's CLI applies the display rotation), scaled
    to `size`, as gray pixels."""
    w, h = size
    raw = subprocess.run([ffmpeg.ffmpeg_exe(), "-v", "error", "-i", str(src), "-vf",
                          f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
                         capture_output=True, check=True, timeout=120).stdout  # fmt: skip
    return list(np.frombuffer(raw, np.uint8).reshape(-1, h, w))


def cut_all(path: Path, tmp_path: Path, scenes_cfg: ScenesConfig | None = None,
            cut: CutConfig = CUT):  # fmt: skip
    """The pipeline's cut of every scene of `path`: (clips, scenes)."""
    pr = probe(path)
    res = detect_scenes(str(path), pr, scenes_cfg or ScenesConfig())
    cfg = PipelineConfig()
    cfg.cut = cut
    proc = SourceProcessor(cfg, str(tmp_path / "out"))
    clips = [Clip(f"c{i}", "s", "u", i, 0, 1, 0, 1, 1, pr.width, pr.height, 25.0)
             for i in range(len(res.spans))]  # fmt: skip
    plans = [plan_cut(sp, res, cfg.cut, pr) for sp in res.spans]
    for clip, plan in zip(clips, plans, strict=True):
        proc._apply_plan(clip, plan)
    proc._cut_all(path, clips, plans, res, pr)
    return clips, res


def assert_exact(path: Path, clips: list[Clip]) -> None:
    """Each clip shows its span's frames: copies bit-exact, re-encodes each frame close to
    the source frame it should be (a frame of another shot is far: ~30-100 levels)."""
    src = gray(path)
    for c in clips:
        assert c.status == "accepted", (c.clip_id, c.reason, c.error)
        got = gray(c.data)
        assert len(got) == c.end_frame - c.start_frame, (c.clip_id, len(got), c.cut_method)
        for j, g in enumerate(got):
            want = c.start_frame + j
            if c.cut_method == "copy":
                assert np.array_equal(g, src[want]), (c.clip_id, j)
                continue
            err = np.abs(g.astype(int) - src[want]).mean()  # crf 12: ~1 level
            assert err < 4, (c.clip_id, j, err)


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_copies_of_b_frame_encodes_hold_exactly_their_shot(tmp_path, container):
    """x264 'veryfast' (3 B-frames) with IDRs at the cuts: every shot is a stream copy of
    exactly its frames (ffmpeg's -ss/-t copy gave 2 frames of the next shot in mp4 and the
    whole previous shot in Matroska); scenes split mid-GOP (max_clip_s) are copies only
    where the packets allow it, re-encodes otherwise, and exact either way."""
    spec = VideoSpec(480, 270, 25, (2.0, 3.0, 2.0), preset="veryfast", container=container)
    path = make_video(tmp_path / f"b.{container}", spec)
    with av.open(str(path)) as c:  # B-frames: some packet is decoded before an earlier frame
        pts = [p.pts for p in c.demux(video=0) if p.size]
    assert any(b < a for a, b in zip(pts, pts[1:], strict=False))
    clips, res = cut_all(path, tmp_path)
    assert [c.start_frame for c in clips] == [0, *spec.cut_frames()]
    assert [c.cut_method for c in clips] == ["copy"] * 3
    assert_exact(path, clips)
    assert [c.duration_s for c in clips] == pytest.approx([2.0, 3.0, 2.0], abs=1e-6)
    assert [c.fps for c in clips] == pytest.approx([25.0] * 3)

    split, _ = cut_all(path, tmp_path, ScenesConfig(max_clip_s=0.7))
    assert len(split) > 6 and "reencode" in {c.cut_method for c in split}
    assert_exact(path, split)


@pytest.mark.parametrize("gop", [12, 250])
def test_reencoded_cuts_of_mpeg_ts_start_at_their_scene(tmp_path, gop):
    """MPEG-TS has no index: a seek lands on the keyframe after the time asked, so a clip
    re-encoded from the scene start lost the frames before that keyframe (8 here with
    12-frame GOPs), and with one keyframe in the file ffmpeg encoded nothing. The cut now
    seeks a GOP earlier (or not at all) and drops frames up to the start on output."""
    spec = VideoSpec(480, 270, 25, (4.0, 3.0), gop=gop, keyframes_at_cuts=False)
    mp4 = make_video(tmp_path / "src.mp4", spec)
    ts = tmp_path / "src.ts"
    ffmpeg.run(["-y", "-i", str(mp4), "-c", "copy", "-f", "mpegts", str(ts)], 60)
    clips, res = cut_all(ts, tmp_path)
    assert [c.start_frame for c in clips] == [0, 100]
    assert clips[1].cut_method == "reencode"
    assert_exact(ts, clips)


def _remux(src: Path, dst: Path, *pre: str) -> Path:
    ffmpeg.run(["-y", *pre, "-i", str(src), "-c", "copy", str(dst)], 60)
    return dst


@pytest.mark.parametrize("kind", ["rotated", "anamorphic", "odd"])
def test_clips_are_upright_square_pixel_and_even(tmp_path, kind):
    """A phone video stored landscape with a 90-degree display rotation, a 4:3-SAR
    anamorphic 16:9 video and an odd-sized one: the clips are re-encoded (a copy kept the
    rotation and the SAR, which the trainer's decoder ignores; libx264 refused odd sizes)
    to the displayed picture, so the manifest's size is the picture's and the same for
    every clip."""
    if kind == "rotated":
        base = make_video(tmp_path / "b.mp4", VideoSpec(480, 270, 25, (2.0, 2.0)))
        src = _remux(base, tmp_path / "rot.mp4", "-display_rotation", "90")
        size = (270, 480)
    elif kind == "anamorphic":
        base = make_video(tmp_path / "b.mp4", VideoSpec(360, 270, 25, (2.0, 2.0)))
        src = tmp_path / "sar.mp4"
        ffmpeg.run(["-y", "-i", str(base), "-vf", "setsar=4/3", "-c:v", "libx264", "-preset",
                    "ultrafast", "-g", "250", "-force_key_frames", "2", str(src)], 60)  # fmt: skip
        size = (480, 270)
    else:
        base = make_video(tmp_path / "b.mp4", VideoSpec(482, 272, 25, (2.0, 2.0)))
        src = tmp_path / "odd.mp4"  # 4:4:4, which x264 encodes at odd sizes
        ffmpeg.run(["-y", "-i", str(base), "-vf", "format=yuv444p,crop=481:271:0:0", "-c:v",
                    "libx264", "-preset", "ultrafast", "-force_key_frames", "2", str(src)],
                   60)  # fmt: skip
        size = (480, 270)
    pr = probe(src)
    assert (pr.width, pr.height) == (size if kind != "odd" else (481, 271))
    clips, _ = cut_all(src, tmp_path)
    assert [c.cut_method for c in clips] == ["reencode"] * 2
    upright = displayed(src, size)
    for c in clips:
        assert c.status == "accepted", (c.reason, c.error)
        assert (c.width, c.height) == size
        with av.open(io.BytesIO(c.data)) as f:
            vs = f.streams.video[0]
            assert (vs.codec_context.width, vs.codec_context.height) == size
            assert (vs.sample_aspect_ratio or 1) == 1
            first = next(f.decode(vs))
            assert not first.rotation
        frames = gray(c.data)
        assert len(frames) == c.end_frame - c.start_frame == 50
        err = np.abs(frames[0].astype(int) - upright[c.start_frame]).mean()
        assert err < 6, err


def test_a_cut_that_encodes_nothing_fails_with_its_reason(tmp_path, monkeypatch):
    """A cut whose output holds no frame (or fewer than the scene's) is the clip's failure
    with the counts, not an IndexError from reading it."""
    from hdvg import cut

    path = make_video(tmp_path / "v.mp4", VideoSpec(480, 270, 25, (2.0, 2.0), gop=250,
                                                    keyframes_at_cuts=False))  # fmt: skip
    real = cut._args

    def late(src, plan, scenes, cfg):  # asks for the frames after the end of the file
        inp, out = real(src, plan, scenes, cfg)
        return ["-ss", "30", *inp[2:]], out

    monkeypatch.setattr(cut, "_args", late)
    clips, _ = cut_all(path, tmp_path)
    bad = clips[1]
    assert bad.status == "failed" and bad.reason == "cut_error"
    assert any(w in bad.error for w in ("no video stream", "empty clip", "frames")), bad.error
    assert clips[0].status == "accepted"


def test_keep_audio_cuts_the_audio_with_the_clip(tmp_path):
    """cut.keep_audio: copies and re-encodes both carry the source's audio for the clip's
    span (re-encodes mapped only the video before); off (the default), clips are silent."""
    base = make_video(tmp_path / "b.mp4", VideoSpec(480, 270, 25, (2.2, 2.0, 1.8), gop=25,
                                                    keyframes_at_cuts=False))  # fmt: skip
    src = tmp_path / "av.mp4"
    ffmpeg.run(["-y", "-i", str(base), "-f", "lavfi", "-i", "sine=frequency=440:duration=6",
                "-c:v", "copy", "-c:a", "aac", "-shortest", str(src)], 60)  # fmt: skip
    for keep in (True, False):
        cut = CutConfig(preset="ultrafast", crf=12, keep_audio=keep)
        clips, _ = cut_all(src, tmp_path, cut=cut)
        assert {c.cut_method for c in clips} == {"copy", "reencode"}
        assert_exact(src, clips)
        for c in clips:
            with av.open(io.BytesIO(c.data)) as f:
                assert bool(f.streams.audio) == keep, (c.clip_id, c.cut_method)
                if keep:
                    a = f.streams.audio[0]
                    pts = [p.pts * a.time_base for p in f.demux(a) if p.pts is not None]
                    span = float(max(pts) - min(pts))
                    assert abs(span - (c.end_s - c.start_s)) < 0.1, (c.cut_method, span)
