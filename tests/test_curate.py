"""`hdvg curate` end to end on a real local Ray, over media made with ffmpeg."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from hdvg.cli import main
from hdvg.config import load_pipeline
from hdvg.runner import curate

ROOT = Path(__file__).resolve().parents[1]


def _clips(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest" / "clips").to_pylist()


def _sources(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest" / "sources").to_pylist()


def test_every_source_and_candidate_is_a_row(curated, media_dir):
    sources = {Path(s["source_url"]).name: s for s in _sources(curated)}
    assert set(sources) == set(media_dir)
    clips = _clips(curated)
    by_source: dict[str, list[dict]] = {}
    for c in clips:
        by_source.setdefault(Path(c["source_url"]).name, []).append(c)
    for name, m in media_dir.items():
        src = sources[name]
        if m.expect in ("empty", "not_video"):
            assert src["status"] == "failed" and src["reason"] == m.expect, src
            assert name not in by_source
        elif m.expect == "failed":  # truncated / corrupt: a failed source with a reason
            assert src["status"] == "failed" and src["reason"], src
            assert src["error"]
        else:
            assert src["status"] == "downloaded"
            rows = by_source[name]
            assert len(rows) == src["n_clips"] >= 2
            for r in rows:
                want = m.expect
                if want == "accepted":
                    assert r["status"] == "accepted" and r["reason"] is None, r
                else:
                    assert r["status"] == "rejected" and r["reason"] == want, r


def test_rejected_clips_keep_all_scores(curated):
    for c in _clips(curated):
        if c["status"] == "failed":
            continue
        for col in ("short_side", "aspect_ratio", "aspect_error", "letterbox_fraction"):
            assert c[col] is not None, (c["clip_id"], col)
        decisions = json.loads(c["decisions"])
        assert {d["stage"] for d in decisions} >= {"duration", "resolution", "aspect", "letterbox"}
        failing = [d for d in decisions if not d["passed"]]
        assert (c["status"] == "rejected") == bool(failing)
        if failing:
            assert c["reason"] == failing[0]["reason"]


def test_letterbox_scores(curated):
    rows = [c for c in _clips(curated) if "letterboxed" in c["source_url"]]
    assert rows and all(c["letterbox_fraction"] == pytest.approx(0.256, abs=0.02) for c in rows)
    assert all(c["content_aspect"] == pytest.approx(1280 / 536, rel=0.03) for c in rows)


def test_accepted_clips_decode_and_match_manifest(curated):
    accepted = [c for c in _clips(curated) if c["status"] == "accepted"]
    assert len(accepted) >= 10
    methods = {c["cut_method"] for c in accepted}
    assert methods == {"copy", "reencode"}
    for c in accepted:
        with open(curated / "shards" / c["shard"], "rb") as f:
            f.seek(c["tar_offset"])
            data = f.read(c["size_bytes"])
        assert hashlib.sha256(data).hexdigest() == c["sha256"]
        with av.open(io.BytesIO(data)) as cont:
            s = cont.streams.video[0]
            frames = list(cont.decode(s))
            assert (frames[0].width, frames[0].height) == (c["width"], c["height"])
        assert len(frames) == pytest.approx(c["end_frame"] - c["start_frame"], abs=1)
        span = frames[-1].time - frames[0].time + 1 / c["fps"]
        assert span == pytest.approx(c["duration_s"], abs=1.5 / c["fps"])
        assert c["duration_s"] == pytest.approx(c["end_s"] - c["start_s"], abs=1.5 / c["fps"])


def test_shards_read_back_with_webdataset(curated):
    import webdataset as wds

    shards = sorted(str(p) for p in (curated / "shards").glob("shard-*.tar"))
    assert shards
    keys = []
    for sample in wds.WebDataset(shards, shardshuffle=False):
        keys.append(sample["__key__"])
        row = json.loads(sample["json"])
        assert row["clip_id"] == sample["__key__"]
        assert hashlib.sha256(sample["mp4"]).hexdigest() == row["sha256"]
        assert sample["txt"].decode() == (row["caption"] or "")
    accepted = [c["clip_id"] for c in _clips(curated) if c["status"] == "accepted"]
    assert sorted(keys) == sorted(accepted)
    assert len(set(keys)) == len(keys)
    all_ids = [c["clip_id"] for c in _clips(curated)]
    assert len(set(all_ids)) == len(all_ids)


def test_tar_members_sorted_and_fixed(curated):
    for p in (curated / "shards").glob("*.tar"):
        with tarfile.open(p) as t:
            names = t.getnames()
            assert names == sorted(names)
            assert {m.mtime for m in t.getmembers()} == {0}


def test_run_json_and_keys_are_stable(curated):
    run = json.loads((curated / "run.json").read_text())
    assert run["counts"]["sources"] == len(_sources(curated))
    assert run["counts"]["clips_by_status"]["accepted"] >= 10
    assert {"download", "probe", "scenes", "cut"} <= set(run["stage_seconds"])
    for c in _clips(curated):
        sid = hashlib.sha256(c["source_url"].encode()).hexdigest()[:16]
        assert c["clip_id"] == f"{sid}_{c['clip_index']:04d}" and c["source_id"] == sid


def test_same_job_twice_gives_identical_shards(curated, media_dir, ray_local, tmp_path):
    listing = tmp_path / "sources.txt"
    listing.write_text("".join(f"{m.path}\n" for m in media_dir.values()))
    out = tmp_path / "again"
    curate(load_pipeline(ROOT / "pipelines" / "smoke.yaml"), str(listing), out, quiet=True)
    a = sorted(p.name for p in (curated / "shards").glob("*.tar"))
    b = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert a == b
    for name in a:
        assert (curated / "shards" / name).read_bytes() == (out / "shards" / name).read_bytes()


def test_rerun_same_output_is_a_noop(curated, tmp_path, media_dir, ray_local):
    out = tmp_path / "copy"
    shutil.copytree(curated, out)
    listing = tmp_path / "sources.txt"
    listing.write_text("".join(f"{m.path}\n" for m in media_dir.values()))
    before = sorted(p.name for p in (out / "manifest" / "clips").glob("*.parquet"))
    # through the CLI, in this process: a Ray the caller started outlives the command
    smoke = ROOT / "pipelines" / "smoke.yaml"
    assert main(["curate", str(smoke), "--input", str(listing), "--output", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert ray_local.is_initialized()
    after = sorted(p.name for p in (out / "manifest" / "clips").glob("*.parquet"))
    assert before == after
    ids = [c["clip_id"] for c in _clips(out)]
    assert len(ids) == len(set(ids))


def _curate_cli(pipeline, inp, out) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hdvg", "curate", str(pipeline), "--input", str(inp),
           "--output", str(out)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenes: {detecter: adaptive}\n")
    r = _curate_cli(bad, tmp_path, tmp_path / "o")
    assert r.returncode == 2 and "detecter" in r.stderr
    smoke = ROOT / "pipelines" / "smoke.yaml"
    r = _curate_cli(smoke, tmp_path / "missing.txt", tmp_path / "o")
    assert r.returncode == 2 and "missing.txt" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "in").mkdir()
    r = _curate_cli(smoke, tmp_path / "in", blocker / "out")
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_progress_and_summary_lines(media_dir, ray_local, tmp_path, capsys):
    """A run says how far it is (sources, footage, realtime factor, clips, time left) and
    ends with the summary: sources, clips accepted and rejected by reason, stage seconds."""
    import re

    picked = [media_dir["hd720.mp4"], media_dir["sd480.mp4"]]
    listing = tmp_path / "sources.txt"
    listing.write_text("".join(f"{m.path}\n" for m in picked))
    curate(load_pipeline(ROOT / "pipelines" / "smoke.yaml"), str(listing), tmp_path / "o")
    err = capsys.readouterr().err
    last = [ln for ln in err.splitlines() if ln.startswith("[hdvg] sources 2/2")][-1]
    minutes = float(re.search(r"\| ([\d.]+) min of video, ([\d.]+)x realtime", last).group(1))
    footage = sum(sum(m.spec.segments) for m in picked) / 60
    assert abs(minutes - footage) < 0.06
    assert "clips accepted 2 rejected 2 failed 0" in last and "left" not in last
    assert "rejected by reason: {'resolution': 2}" in err
    assert re.search(r"stage seconds \(summed over workers\): .*scenes [\d.]+s", err)
