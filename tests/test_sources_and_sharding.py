"""Input list formats, fsspec sources, and shard size targets."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from hdvg.config import load_pipeline
from hdvg.records import source_id_for
from hdvg.runner import curate
from hdvg.sources import SourceListError, read_sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_list_formats(tmp_path, fmt):
    rows = [
        {"url": "/data/a.mp4", "caption": "a cat", "id": "A", "start": "1.5", "end": "9"},
        {"url": "https://example.com/b.mp4", "caption": None, "id": None, "start": None,
         "end": None},
    ]  # fmt: skip
    p = tmp_path / f"list.{fmt}"
    if fmt == "txt":
        p.write_text("# comment\n/data/a.mp4\n\nhttps://example.com/b.mp4\n/data/a.mp4\n")
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(p, index=False)
    elif fmt == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(p)
    tasks = read_sources(p)
    assert [t.url for t in tasks] == ["/data/a.mp4", "https://example.com/b.mp4"]
    assert [t.order for t in tasks] == [0, 1]
    assert tasks[0].source_id == source_id_for("/data/a.mp4")
    if fmt != "txt":
        assert tasks[0].input_caption == "a cat" and tasks[0].input_id == "A"
        assert (tasks[0].start_s, tasks[0].end_s) == (1.5, 9.0)
        assert tasks[1].input_caption is None and tasks[1].start_s is None


def test_spellings_of_one_local_file_are_one_source(tmp_path, monkeypatch):
    """A list naming one file as a path, a path with `.` / `..` parts, a relative path and a
    `file://` URL holds it once (each spelling used to be its own source, with the same
    clips); a dangling link in an input directory is listed (a `not_found` row later)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v").mkdir()
    a = tmp_path / "v" / "a b.mp4"
    spellings = [str(a), f"{tmp_path}/v/./a b.mp4", f"{tmp_path}/v/../v/a b.mp4", "v/a b.mp4",
                 "file://" + str(a).replace(" ", "%20"), f"file://localhost{a}"]  # fmt: skip
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{u}\n" for u in [*spellings, "https://example.com/a.mp4"]))
    tasks = read_sources(lst)
    assert [t.url for t in tasks] == [str(a), "https://example.com/a.mp4"]
    assert len({source_id_for(u) for u in spellings}) == 1
    assert source_id_for("https://example.com/./a.mp4") != source_id_for(
        "https://example.com/a.mp4"
    )  # remote URLs are the server's to interpret
    a.write_bytes(b"x")
    (tmp_path / "v" / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    assert [Path(t.url).name for t in read_sources(tmp_path / "v")] == ["a b.mp4", "nowhere.mp4"]


def test_unreadable_lists_are_clear_errors(tmp_path):
    with pytest.raises(SourceListError, match="not found"):
        read_sources(tmp_path / "nope.txt")
    bad = tmp_path / "x.csv"
    bad.write_text("path\n/a.mp4\n")
    with pytest.raises(SourceListError, match="url"):
        read_sources(bad)
    odd = tmp_path / "x.xml"
    odd.write_text("<a/>")
    with pytest.raises(SourceListError, match="unsupported"):
        read_sources(odd)


def test_fsspec_source_and_shard_targets(tmp_path, media_dir, ray_local):
    """A `memory://` source (any fsspec URL) and small shard targets, on the local Ray."""
    import fsspec

    fs = fsspec.filesystem("memory")
    # the memory filesystem lives in this process: use the serial executor for it
    fs.pipe("/bucket/hd720.mp4", media_dir["hd720.mp4"].path.read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text("memory://bucket/hd720.mp4\n")
    cfg = load_pipeline(ROOT / "pipelines" / "smoke.yaml")
    cfg.ray.executor = "serial"
    cfg.download.allowed_schemes.append("memory")
    out = tmp_path / "mem"
    curate(cfg, str(listing), out, quiet=True)
    clips = pq.read_table(out / "manifest" / "clips").to_pylist()
    assert [c["status"] for c in clips] == ["accepted", "accepted"]
    src = pq.read_table(out / "manifest" / "sources").to_pylist()[0]
    assert src["sha256"] and src["size_bytes"] == media_dir["hd720.mp4"].path.stat().st_size
    assert not list((out / ".work" / "downloads").glob("*"))  # temporary download removed

    # shard targets: at most 2 samples per shard unless one source alone has more
    # ... listed with a caption column: the captions reach the clips ({key}.txt, and the
    # manifest's source_caption) when no caption model runs
    names = ["hd1080.mp4", "hd720.mp4", "nokey720.mp4", "late.ts"]
    caps = {"hd720.mp4": "a test card, then a fractal", "late.ts": 'late, "quoted" text'}
    listing = tmp_path / "list.csv"
    pd.DataFrame({"url": [str(media_dir[n].path) for n in names],
                  "caption": [caps.get(n) for n in names]}).to_csv(listing, index=False)  # fmt: skip
    cfg = load_pipeline(ROOT / "pipelines" / "smoke.yaml")
    cfg.shards.max_samples = 2
    out = tmp_path / "small"
    curate(cfg, str(listing), out, quiet=True)
    shards = sorted((out / "shards").glob("shard-*.tar"))
    per_source = {}
    for c in pq.read_table(out / "manifest" / "clips").to_pylist():
        per_source.setdefault(c["source_id"], set()).add(c["shard"])
    assert all(len(s) == 1 for s in per_source.values())  # a source never spans shards
    assert len(shards) == 4
    texts = {}
    for sh in shards:
        with tarfile.open(sh) as t:
            n = len(t.getnames()) // 3
            texts |= {m.name[:-4]: t.extractfile(m).read().decode() for m in t if
                      m.name.endswith(".txt")}  # fmt: skip
        assert n <= 3  # hd1080 alone has 3 clips
    by_path = {str(media_dir[n].path): n for n in names}
    rows = pq.read_table(out / "manifest" / "clips").to_pylist()
    assert len(texts) == len(rows) == 9
    for c in rows:
        want = caps.get(by_path[c["source_url"]])
        assert (c["source_caption"], texts[c["clip_id"]]) == (want, want or ""), c["clip_id"]
    cfg.shards.max_samples = 1000
    cfg.shards.max_bytes = 1
    out = tmp_path / "bytes"
    curate(cfg, str(listing), out, quiet=True)
    assert len(list((out / "shards").glob("shard-*.tar"))) == 4


def test_a_commit_killed_before_its_renames_stays_invisible(tmp_path, monkeypatch):
    """Parts being written (or left by a killed run) are hidden from whoever reads the
    manifest folders meanwhile -- pyarrow on the directory, the DuckDB views -- and the
    next run deletes them."""
    import os

    from hdvg.manifest.read import connect
    from hdvg.manifest.writer import DatasetWriter, Ledger
    from hdvg.records import SourceRecord, SourceResult

    out = tmp_path / "out"
    meta = {"pipeline_version": "test", "config_hash": "h"}
    w = DatasetWriter(out, meta, [])
    w.add(SourceResult(SourceRecord("s0", "u0", 0, status="failed", reason="not_found")))
    w.commit()
    real = os.replace

    def killed_at_the_sources_rename(src, dst):
        if Path(dst).parent.name == "sources":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr("hdvg.manifest.writer.os.replace", killed_at_the_sources_rename)
    w.add(SourceResult(SourceRecord("s1", "u1", 1, status="failed", reason="not_found")))
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.undo()
    left = sorted(p.name for p in (out / "manifest" / "sources").iterdir())
    assert left == [".part-000001.parquet.tmp", "part-000000.parquet"]
    assert pq.read_table(out / "manifest" / "sources").column("source_id").to_pylist() == ["s0"]
    assert connect(out).sql("SELECT source_id FROM sources").fetchall() == [("s0",)]
    ledger = Ledger(out)  # what a rerun does first
    assert ledger.done_sources == {"s0": "failed"} and ledger.next_part == 1
    for d in ("clips", "sources"):  # the tmp half and the clips half renamed alone are gone
        assert sorted(p.name for p in (out / "manifest" / d).iterdir()) == ["part-000000.parquet"]
