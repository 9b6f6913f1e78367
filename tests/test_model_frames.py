"""Weight-free model stages on real, moving media made by ffmpeg at test time: the static
overlay detector (burned-in channel name / corner logo, letterbox, static shot), motion
and text area; and the shared one-decode-per-clip frame cache."""

from __future__ import annotations

import gc

import pytest

from hdvg import ffmpeg, frames
from hdvg.records import Clip
from hdvg.stages import build_stage

W, H = 640, 360
MOVING = f"mandelbrot=size={W}x{H}:rate=25"  # zooms: every region of the picture changes


def _make(path, src: str, vf: str | None = None, extra_inputs: list[str] | None = None) -> bytes:
    args = ["-y", "-f", "lavfi", "-i", src, *(extra_inputs or []), "-t", "3"]
    if vf:
        args += ["-filter_complex" if extra_inputs else "-vf", vf]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "26", "-pix_fmt", "yuv420p",
             "-an", str(path)]  # fmt: skip
    ffmpeg.run(args, 120, what="test media")
    return path.read_bytes()


def make_overlay_media(d) -> dict:
    """The overlay test set, as files: moving content with and without burned-in marks."""
    text = "drawtext=text='CH7 NEWS':x=w-tw-20:y=20:fontsize=26:fontcolor=white@0.9:box=1:boxcolor=black@0.4"
    specs = {
        "clean": (MOVING, None, None),
        "channel": (MOVING, text, None),
        # a corner logo: a white badge with a dark ring, composited with `overlay`
        "logo": (MOVING,
                 "[1:v]drawbox=x=8:y=8:w=48:h=24:color=black@0.8:t=4[l];[0:v][l]overlay=16:H-h-16",
                 ["-f", "lavfi", "-i", "color=c=white:s=64x40:r=25"]),
        "static": (MOVING, "select=eq(n\\,0),loop=loop=80:size=1:start=0,setpts=N/25/TB,"
                   "noise=alls=3:allf=t", None),
        # 2.39:1 picture letterboxed in 16:9, a channel name inside the bottom bar
        "letterbox": (f"mandelbrot=size={W}x268:rate=25", "pad=640:360:0:46:black", None),
        "letterbox_logo": (f"mandelbrot=size={W}x268:rate=25",
                           "pad=640:360:0:46:black,drawtext=text='CH7':x=w-tw-20:"
                           "y=h-th-10:fontsize=24:fontcolor=white", None),
        "text": (MOVING, ",".join(
            f"drawtext=text='{t}':x=20:y={40 + 60 * i}:fontsize=30:fontcolor=white"
            for i, t in enumerate(["Lorem ipsum dolor sit amet", "consectetur adipiscing elit",
                                   "do eiusmod tempor incididunt", "ut labore et dolore magna"])),
            None),
    }  # fmt: skip
    out = {}
    for name, (src, vf, extra) in specs.items():
        out[name] = d / f"{name}.mp4"
        _make(out[name], src, vf, extra)
    return out


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    files = make_overlay_media(tmp_path_factory.mktemp("overlay"))
    return {k: p.read_bytes() for k, p in files.items()}


def _clip(data: bytes, name: str = "c") -> Clip:
    return Clip(f"{name}_0000", name, f"file:///{name}.mp4", 0, 0.0, 3.0, 0, 75, 3.0, W, H, 25.0,
                data=data)  # fmt: skip


def _run(stage_name: str, data: bytes, **params) -> Clip:
    st = build_stage(stage_name, params)
    st.setup()
    c = _clip(data)
    st.process_batch([c], [None])
    return c


def _box(c: Clip) -> tuple[float, float, float, float]:
    return tuple(c.scores[k] for k in ("overlay_x", "overlay_y", "overlay_w", "overlay_h"))


def _inside(box, region) -> bool:
    """The detected box lies within the expected region (x0, y0, x1, y1), in clip pixels."""
    x, y, w, h = box
    x0, y0, x1, y1 = region
    return x >= x0 and y >= y0 and x + w <= x1 and y + h <= y1


def test_channel_name_flagged_with_box(vids):
    c = _run("static_overlay", vids["channel"])
    assert c.status == "rejected" and c.reason == "watermark"
    assert c.scores["overlay_score"] > 0.8
    # drawtext at top right: x from ~490 to 620, y from 20 to ~50 (plus its box)
    assert _inside(_box(c), (440, 5, 640, 70)), _box(c)
    assert c.scores["overlay_w"] >= 60


def test_corner_logo_flagged_with_box(vids):
    c = _run("static_overlay", vids["logo"])
    assert c.reason == "watermark"
    assert _inside(_box(c), (5, 360 - 16 - 40 - 12, 16 + 64 + 12, 355)), _box(c)


def test_same_clip_without_overlay_not_flagged(vids):
    c = _run("static_overlay", vids["clean"])
    assert c.status == "accepted"
    assert c.scores["overlay_score"] < 0.2 and c.scores["overlay_x"] is None
    assert c.scores["moving_fraction"] > 0.5


def test_static_shot_is_not_a_watermark(vids):
    c = _run("static_overlay", vids["static"])
    assert c.status == "accepted" and c.scores["overlay_score"] == 0.0
    assert c.scores["moving_fraction"] < 0.05


def test_letterbox_seam_is_not_an_overlay_but_a_logo_in_the_bar_is(vids):
    bars = _run("static_overlay", vids["letterbox"])
    assert bars.status == "accepted", bars.scores
    logo = _run("static_overlay", vids["letterbox_logo"])
    assert logo.reason == "watermark"
    assert _inside(_box(logo), (540, 314, 640, 360)), _box(logo)


def test_motion_drops_static_clip_keeps_moving(vids):
    still = _run("motion", vids["static"])
    assert still.reason == "low_motion" and still.scores["motion_score"] < 0.01
    moving = _run("motion", vids["clean"])
    assert moving.status == "accepted" and moving.scores["motion_score"] > 0.05


def test_text_area_flags_heavy_text_only(vids):
    heavy = _run("text_area", vids["text"])
    assert heavy.reason == "text", heavy.scores
    for name in ("clean", "channel", "logo"):  # a small channel name is not heavy text
        c = _run("text_area", vids[name])
        assert c.status == "accepted", (name, c.scores)


def test_frames_decoded_once_and_freed(vids, monkeypatch):
    calls = []
    real = frames.decode_frames
    monkeypatch.setattr(frames, "decode_frames", lambda *a, **k: calls.append(1) or real(*a, **k))
    stages = [build_stage(n, {}) for n in ("static_overlay", "motion", "text_area")]
    c = _clip(vids["channel"])
    for st in stages:
        st.process_batch([c], [None])
    assert len(calls) == 1 and frames.cached_count() >= 1
    fr = frames.get_frames(c)
    assert fr.images.shape[1:] == (360, 640, 3) and fr.indices[fr.middle] == fr.n_frames // 2
    del c, fr
    gc.collect()
    assert frames.cached_count() == 0


def test_undecodable_clip_fails_with_reason():
    c = _clip(b"not an mp4")
    build_stage("motion", {}).process_batch([c], [None])
    assert c.status == "failed" and c.reason == "decode_error"


def _full_decode(data: bytes, spec: frames.FrameSpec) -> tuple:
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as c:
        every = [f.to_ndarray(width=640, height=360, format="rgb24") for f in c.decode(video=0)]
    idx, _ = frames.sample_indices(len(every), spec.n)
    return (np.stack([every[i] for i in idx]),
            np.stack([every[min(i + 1, len(every) - 1)] for i in idx]))  # fmt: skip


def test_sampled_frames_exact_with_b_frames_skipped(tmp_path):
    """Frames nothing refers to are skipped between the kept ones; the kept frames, found by
    timestamp, are pixel-identical to those of a full decode (B-pyramid x264 media)."""
    src = "testsrc2=size=960x540:rate=25,noise=alls=20:allf=t"
    p = tmp_path / "b.mp4"
    ffmpeg.run(["-y", "-f", "lavfi", "-i", src, "-t", "2", "-c:v", "libx264", "-preset",
                "veryfast", "-bf", "3", "-g", "250", "-pix_fmt", "yuv420p", str(p)], 120,
               what="test media")  # fmt: skip
    data = p.read_bytes()
    for spec in (frames.DEFAULT_SPEC, frames.MIDDLE_ONLY):
        fr = frames.decode_frames(data, spec)
        images, nexts = _full_decode(data, spec)
        assert fr.images.shape == images.shape and (fr.images == images).all(), spec
        if spec.nexts:
            assert (fr.nexts == nexts).all()
    mid = frames.decode_frames(data, frames.MIDDLE_ONLY)
    assert mid.indices == [mid.n_frames // 2] == [25] and mid.middle == 0


@pytest.mark.parametrize("gop", ["closed", "open"])
def test_gops_without_kept_frames_are_skipped_exactly(tmp_path, gop):
    """Short GOPs with B-frames (a stream copy of web video keeps them): with closed GOPs
    (IDR keyframes) only the GOPs that hold a kept frame are decoded; open GOPs (leading
    pictures refer to the GOP before) are decoded whole. Every kept frame and its successor,
    for many sample counts, equal a full decode's pixel for pixel (the last GOP's frames
    included: the decoder is drained when the packets left are skipped)."""
    import io

    import av

    src = "testsrc2=size=320x180:rate=25,noise=alls=20:allf=t"
    p = tmp_path / f"{gop}.mp4"
    x264 = ["-x264-params", "open-gop=1"] if gop == "open" else []
    ffmpeg.run(["-y", "-f", "lavfi", "-i", src, "-t", "4", "-c:v", "libx264", "-preset",
                "veryfast", "-bf", "3", "-g", "12", "-sc_threshold", "0", *x264,
                "-pix_fmt", "yuv420p", str(p)], 120, what="test media")  # fmt: skip
    data = p.read_bytes()
    with av.open(io.BytesIO(data)) as c:
        packets = [pk for pk in c.demux(video=0) if pk.size]
    with av.open(io.BytesIO(data)) as c:
        every = [f.to_ndarray(width=320, height=180, format="rgb24") for f in c.decode(video=0)]
    assert sum(pk.is_keyframe for pk in packets) >= 8
    pts = sorted(pk.pts for pk in packets)
    mid = pts[len(pts) // 2]
    needed = frames._needed_packets(packets, {mid}, "h264")
    if gop == "closed":  # IDR keyframes: the middle frame's GOP alone is decoded
        assert sum(needed) == 12 < len(packets) / 8
    else:  # recovery-point keyframes, leading B-frames referring back: everything
        assert all(needed)
    for n in (0, 1, 2, 3, 5, 8, 13):
        spec = frames.FrameSpec(n=n, max_side=320, nexts=n > 0)
        fr = frames.decode_frames(data, spec, threads=1)
        for j, i in enumerate(fr.indices):
            assert (fr.images[j] == every[i]).all(), (gop, n, i)
            if spec.nexts and i + 1 < len(every):
                assert (fr.nexts[j] == every[i + 1]).all(), (gop, n, i + 1)


def test_caption_only_recipe_decodes_the_middle_frame_alone():
    cap = build_stage("caption", {})
    assert frames.spec_for([cap]) == frames.MIDDLE_ONLY
    assert frames.spec_for([cap, build_stage("motion", {})]) == frames.DEFAULT_SPEC
    assert frames.spec_for([build_stage("caption", {"frames": "multi"})]) == frames.DEFAULT_SPEC
    assert frames.spec_for([build_stage("resolution", {})]) is None


def test_recipe_frame_spec_stays_with_its_stages(vids):
    """A model actor gives its own stages the recipe's frame spec; stages built elsewhere in
    the same process keep decoding every frame they read (no process-wide state)."""
    from hdvg.config import PipelineConfig
    from hdvg.pipeline import ModelStageActor

    cap = build_stage("caption", {})
    ModelStageActor(PipelineConfig(), stages=[cap])
    assert cap.frame_spec == frames.MIDDLE_ONLY
    motion = build_stage("motion", {})
    c = _clip(vids["clean"])
    motion.process_batch([c], [None])
    assert len(frames.get_frames(c).indices) == 9 and c.scores["motion_score"] > 0.05


def test_keyframe_nal_types_length_prefixed_and_annex_b():
    """IDR detection reads the NAL unit types of MP4 (4-byte length) and Annex-B packets."""
    sei, idr, sps, pps = bytes([0x06, 9]), bytes([0x65, 1, 2]), bytes([0x67, 3]), bytes([0x68, 4])
    avcc = b"".join(len(n).to_bytes(4, "big") + n for n in (sei, idr))
    assert frames._nal_types(avcc, "h264") == {6, 5}
    annex_b = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x01" + pps + b"\x00\x00\x01" + idr
    assert frames._nal_types(annex_b, "h264") == {7, 8, 5}
    non_idr = len(bytes([0x41, 7])).to_bytes(4, "big") + bytes([0x41, 7])  # a P slice
    assert frames._nal_types(non_idr, "h264") == {1}
    cra = b"\x00\x00\x01" + bytes([21 << 1, 1])  # HEVC CRA: an open GOP's keyframe
    assert frames._nal_types(cra, "hevc") == {21}
