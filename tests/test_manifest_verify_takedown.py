"""verify catches corruption, truncation and missing members; takedown removes clips and
leaves verify clean. Each test works on its own copy of the session `curated` output."""

from __future__ import annotations

import io
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from hdvg.cli import main
from hdvg.manifest.query import query
from hdvg.manifest.takedown import TakedownError, takedown
from hdvg.manifest.verify import verify


@pytest.fixture
def out(curated, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(curated, dst)
    return dst


def _accepted(out):
    cols = ["clip_id", "source_url", "shard", "tar_offset", "size_bytes"]
    rows = query(out, f"SELECT {', '.join(cols)} FROM clips WHERE status = 'accepted' ORDER BY 1")[
        1
    ]
    return [dict(zip(cols, r, strict=True)) for r in rows]


def _members(path):
    with tarfile.open(path) as tf:
        return [ti.name for ti in tf]


def test_verify_clean_output(curated, capsys):
    rep = verify(curated)
    assert rep.ok, rep.problems
    assert rep.rows_checked == len(_accepted(curated)) and rep.members == 3 * rep.rows_checked
    assert main(["manifest", "verify", str(curated)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_catches_flipped_byte(out, capsys):
    row = _accepted(out)[1]
    path = out / "shards" / row["shard"]
    with open(path, "r+b") as f:
        f.seek(row["tar_offset"] + row["size_bytes"] // 2)
        b = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    rep = verify(out)
    assert [(p.kind, p.clip_id) for p in rep.problems] == [("corrupt", row["clip_id"])]
    assert "sha256" in rep.problems[0].detail
    assert main(["manifest", "verify", str(out)]) == 1
    assert "corrupt" in capsys.readouterr().out


def test_verify_catches_truncated_shard(out):
    rows = _accepted(out)
    last = max(rows, key=lambda r: (r["shard"], r["tar_offset"]))
    path = out / "shards" / last["shard"]
    with open(path, "r+b") as f:
        f.truncate(last["tar_offset"] + last["size_bytes"] // 2)
    rep = verify(out)
    assert not rep.ok
    assert any(p.kind == "truncated" and p.clip_id == last["clip_id"] for p in rep.problems)
    # cut at a header boundary: tarfile would stop quietly; the missing end blocks tell
    with open(path, "r+b") as f:
        f.truncate(last["tar_offset"] - 512)  # drops the mp4's header and everything after
    rep = verify(out)
    assert any(p.kind == "missing" and p.clip_id == last["clip_id"] for p in rep.problems)
    assert any(p.kind == "truncated" and p.clip_id is None for p in rep.problems)


def test_verify_catches_missing_member_and_extra_member(out):
    victim = _accepted(out)[-1]
    path = out / "shards" / victim["shard"]
    src = path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(src)) as tin, tarfile.open(fileobj=buf, mode="w",
                                                                    format=tarfile.USTAR_FORMAT) as tout:  # fmt: skip
        for ti in tin:
            if ti.name != f"{victim['clip_id']}.mp4":
                tout.addfile(ti, tin.extractfile(ti))
        extra = tarfile.TarInfo("ffffffffffffffff_0000.mp4")
        extra.size = 4
        tout.addfile(extra, io.BytesIO(b"abcd"))
    path.write_bytes(buf.getvalue())
    rep = verify(out)
    kinds = {(p.kind, p.clip_id) for p in rep.problems}
    assert ("missing", victim["clip_id"]) in kinds
    assert ("extra", "ffffffffffffffff_0000") in kinds
    assert main(["manifest", "verify", str(out)]) == 1


def test_takedown_source_then_verify_clean(out, capsys):
    rows = _accepted(out)
    url = rows[0]["source_url"]
    gone = {r["clip_id"] for r in rows if r["source_url"] == url}
    kept = {r["clip_id"] for r in rows} - gone
    shard = out / "shards" / rows[0]["shard"]
    before = shard.read_bytes()
    assert main(["manifest", "takedown", str(out), "--source", url, "--reason", "DMCA #42"]) == 0
    assert f"{len(gone)} clips removed" in capsys.readouterr().out
    names = _members(shard)
    assert not any(n.split(".")[0] in gone for n in names)
    assert {n.split(".")[0] for n in names} >= {
        r["clip_id"] for r in rows if r["shard"] == shard.name
    } - gone
    for cid in gone:  # the bytes are gone from the shard, not just unlisted
        assert cid.encode() not in shard.read_bytes()
    assert len(shard.read_bytes()) < len(before)
    assert verify(out).ok
    marked = query(out, f"SELECT clip_id, status, tar_offset, removed_at, removed_reason, sha256 "
                        f"FROM clips WHERE source_url = '{url}'")[1]  # fmt: skip
    assert all(r[3] and r[4] == "DMCA #42" for r in marked)
    assert {r[0] for r in marked if r[1] == "removed"} == gone
    assert all(r[2] is None and r[5] for r in marked if r[1] == "removed")
    assert {r["clip_id"] for r in _accepted(out)} == kept
    # rerun: nothing to do, nothing changes
    after = shard.read_bytes()
    res = takedown(out, sources=[url], reason="again")
    assert res.already and not res.removed and not res.shards_rewritten and not res.parts_rewritten
    assert shard.read_bytes() == after and verify(out).ok


def test_takedown_clip_is_deterministic_and_finishes_interrupted_run(out, tmp_path):
    rows = _accepted(out)
    victim = rows[len(rows) // 2]
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    takedown(out, clips=[victim["clip_id"]], now="2026-01-01T00:00:00Z")
    assert verify(out).ok
    # interrupted after the shard rename, before the manifest parts: a rerun finishes
    res = takedown(twin, clips=[victim["clip_id"]], now="2026-01-01T00:00:00Z")
    assert res.shards_rewritten == [victim["shard"]]
    assert (twin / "shards" / victim["shard"]).read_bytes() == (
        out / "shards" / victim["shard"]
    ).read_bytes()
    for p in sorted((out / "manifest" / "clips").glob("*.parquet")):
        assert (twin / "manifest" / "clips" / p.name).read_bytes() == p.read_bytes()


def test_takedown_interrupted_before_parts_renamed(out, monkeypatch):
    import os

    rows = _accepted(out)
    victim = rows[0]
    real = os.replace
    calls = []

    def crash_on_parts(src, dst):
        if str(dst).endswith(".parquet"):
            calls.append(dst)
            raise KeyboardInterrupt  # the process dies between the shard and part renames
        return real(src, dst)

    monkeypatch.setattr("hdvg.manifest.takedown.os.replace", crash_on_parts)
    with pytest.raises(KeyboardInterrupt):
        takedown(out, clips=[victim["clip_id"]])
    monkeypatch.undo()
    assert calls and not verify(out).ok  # shard rewritten, rows still point at old offsets
    # the rewritten parts wait under hidden names: a reader of the folder sees each row once
    assert list((out / "manifest" / "clips").glob(".part-*.parquet.takedown.tmp"))
    n_rows = query(out, "SELECT count(*) FROM clips")[1][0][0]
    assert pq.read_table(out / "manifest" / "clips").num_rows == n_rows
    res = takedown(out, clips=[victim["clip_id"]])
    assert res.removed == [victim["clip_id"]] and verify(out).ok


def test_takedown_unknown_changes_nothing(out, capsys):
    shard = out / "shards" / _accepted(out)[0]["shard"]
    before = shard.read_bytes()
    with pytest.raises(TakedownError, match="not in the manifest"):
        takedown(out, sources=["https://example.com/nope.mp4"])
    assert main(["manifest", "takedown", str(out), "--clip", "nope_0000"]) == 2
    assert shard.read_bytes() == before
    with pytest.raises(SystemExit):
        main(["manifest", "takedown", str(out)])


def test_verify_over_fsspec_url(curated):
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in curated.rglob("*"):
        if p.is_file():
            fs.pipe(f"/hdvg-verify/out/{p.relative_to(curated).as_posix()}", p.read_bytes())
    rep = verify("memory://hdvg-verify/out")
    assert rep.ok and rep.rows_checked == len(_accepted(curated))
    with pytest.raises(TakedownError, match="local OUT"):
        takedown("memory://hdvg-verify/out", clips=[_accepted(curated)[0]["clip_id"]])
