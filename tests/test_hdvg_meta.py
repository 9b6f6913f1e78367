"""HD-VG-130M released metadata: parsing, and a real curate run whose clips keep the given
`scene_cut` boundaries, ids and captions."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdvg.hdvg_meta import parse_time, read_hdvg_metadata
from hdvg.sources import SourceListError, read_sources

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "manifests" / "hdvg130m_sample.json"


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "hdvg_0.json"
    p.write_text(json.dumps(data))
    return p


def test_parse_time():
    assert parse_time("00:01:46.479", "t") == pytest.approx(106.479)
    assert parse_time("01:02.5", "t") == pytest.approx(62.5)
    assert parse_time(3.25, "t") == 3.25
    with pytest.raises(SourceListError):
        parse_time("1h2m", "t")


def test_sample_in_released_format():
    tasks = read_sources(SAMPLE)  # .json goes through the HD-VG reader
    assert [t.input_id for t in tasks] == ["hdvgSample1", "hdvgSample2"]
    g = tasks[0].given_scenes
    # sorted by time although the file lists them out of order; frames / fps + span start
    assert [s.clip_id for s in g] == [f"hdvgSample1.0_{i}" for i in range(3)] + ["hdvgSample1.1_0"]
    assert [(round(s.start_s, 3), round(s.end_s, 3)) for s in g] == [
        (0.0, 2.4), (2.4, 5.4), (5.4, 5.48), (5.48, 8.0)]  # fmt: skip
    assert g[0].caption == "a test card with a moving dot"


def test_variants_merge_and_errors(tmp_path):
    clip = {"span": ["00:00:10.000", "00:00:20.000"], "fps": 10.0,
            "scene_split": [{"scene_cut": [5, 25], "clip_id": "v.0_0", "caption": "c"}]}  # fmt: skip
    # a dict keyed by video id, and the same URL twice (merged, scenes de-duplicated)
    p = _write(tmp_path, {"vid": {"url": "https://x.invalid/v", "clip": {"v.0.mp4": clip}}})
    (t,) = read_hdvg_metadata(p)
    assert t.input_id == "vid" and (t.given_scenes[0].start_s, t.given_scenes[0].end_s) == (
        10.5,
        12.5,
    )
    other = {"span": ["00:00:30.000", "00:00:31.000"]}  # HD-VILA clip, no scenes: whole span
    p = _write(tmp_path, [{"url": "https://x.invalid/v", "clip": {"v.0.mp4": clip}},
                          {"url": "https://x.invalid/v", "clip": {"v.0.mp4": clip, "v.3.mp4": other}}])  # fmt: skip
    (t,) = read_hdvg_metadata(p)
    assert [(s.clip_id, s.start_s, s.end_s) for s in t.given_scenes] == [
        ("v.0_0", 10.5, 12.5), ("v.3", 30.0, 31.0)]  # fmt: skip
    bad = [
        [{"clip": {}}],  # no url
        [{"url": "u", "clip": {}}],  # no clips
        [{"url": "u", "clip": {"a.0.mp4": {"span": ["00:00:01.000"]}}}],
        [{"url": "u", "clip": {"a.0.mp4": {"span": ["0:0:1", "0:0:2"],
                                           "scene_split": [{"scene_cut": [3, 9]}]}}}],  # no fps
        [{"url": "u", "clip": {"a.0.mp4": {"span": ["0:0:1", "0:0:2"], "fps": 25,
                                           "scene_split": [{"scene_cut": [9, 3]}]}}}],
        {"not": "a list of sources"},
    ]  # fmt: skip
    for data in bad:
        with pytest.raises(SourceListError):
            read_hdvg_metadata(_write(tmp_path, data))


def test_curate_keeps_given_scene_cuts(ray_local, tmp_path):
    from hdvg import media
    from hdvg.config import load_pipeline
    from hdvg.media import VideoSpec
    from hdvg.runner import curate

    # the sample's spans are laid out on two videos with known cuts: rewrite its URLs to them
    specs = [VideoSpec(1280, 720, 25, (2.4, 3.0, 2.6)), VideoSpec(1280, 720, 30, (2.5, 3.2))]
    local = [media.make_video(tmp_path / f"src{i}.mp4", sp) for i, sp in enumerate(specs)]
    data = json.loads(SAMPLE.read_text())
    for entry, path in zip(data, local, strict=True):
        entry["url"] = path.as_uri()
    meta = _write(tmp_path, data)
    cfg = load_pipeline(ROOT / "pipelines" / "smoke.yaml")
    out = tmp_path / "out"
    curate(cfg, str(meta), out, quiet=True)

    rows = {r["source_clip_id"]: r for r in pq.read_table(out / "manifest" / "clips").to_pylist()}
    expected = {}
    for entry in data:
        for clip in entry["clip"].values():
            fps, span = clip["fps"], clip["span"]
            base = round(parse_time(span[0], "") * fps)
            for sc in clip["scene_split"]:
                a, b = sc["scene_cut"]
                end = round(parse_time(span[1], "") * fps) if b == -1 else base + b
                expected[sc["clip_id"]] = (base + a, end, sc["caption"])
    assert set(rows) == set(expected)
    for cid, (a, b, caption) in expected.items():
        r = rows[cid]
        assert r["source_caption"] == caption
        assert abs(r["start_frame"] - a) <= 1 and abs(r["end_frame"] - b) <= 1, (cid, r)
        if b - a <= 4:
            assert (r["status"], r["reason"]) == ("rejected", "too_short"), cid
        else:
            assert (r["status"], r["reason"]) == ("accepted", None), (cid, r["reason"])
            assert r["shard"] and abs(r["duration_s"] - (b - a) / r["fps"]) <= 1.01 / r["fps"]
    sources = pq.read_table(out / "manifest" / "sources").to_pylist()
    assert sorted(s["input_id"] for s in sources) == ["hdvgSample1", "hdvgSample2"]


def test_plain_json_list_is_a_source_list(tmp_path):
    p = _write(tmp_path, [{"url": "https://x.invalid/a.mp4", "caption": "c", "start": 1.5}])
    (t,) = read_sources(p)
    assert (t.input_caption, t.start_s, t.given_scenes) == ("c", 1.5, None)
