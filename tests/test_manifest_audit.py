"""Auditor tools on a real curated output (the session `curated` fixture): SQL, lineage,
schema-version checks. Read-only: tests that change an output copy it first."""

from __future__ import annotations

import json
import shutil

import fsspec
import pyarrow.parquet as pq
import pytest

from hdvg.cli import main
from hdvg.manifest.query import query
from hdvg.manifest.read import SchemaVersionError, connect
from hdvg.manifest.show import ClipNotFound, lineage


def _one(out, sql):
    return query(out, sql)[1]


def _url(curated, name):
    (url,) = _one(
        curated, f"SELECT DISTINCT source_url FROM clips WHERE source_url LIKE '%/{name}'"
    )[0:1]
    return url[0]


def test_query_answers_auditor_questions(curated):
    # what is in the dataset
    by_status = dict(_one(curated, "SELECT status, count(*) FROM clips GROUP BY ALL"))
    assert by_status["accepted"] >= 5 and by_status["rejected"] >= 4
    # which clips come from URL Z
    url = _url(curated, "hd1080.mp4")
    rows = _one(curated, f"SELECT clip_id, status FROM clips WHERE source_url = '{url}' ORDER BY 1")
    sid = _one(curated, f"SELECT source_id FROM sources WHERE source_url = '{url}'")[0][0]
    assert len(rows) == 3 and all(cid.startswith(sid + "_") for cid, _ in rows)
    # why was clip Y dropped: its reason and the failed check's score vs threshold
    sd = _url(curated, "sd480.mp4")
    rows = _one(
        curated,
        "SELECT clip_id, reason, d.score, d.threshold FROM clips, "
        'unnest(from_json(decisions, \'[{"column":"VARCHAR","score":"DOUBLE",'
        '"threshold":"DOUBLE","passed":"BOOLEAN"}]\')) AS t(d) '
        f"WHERE source_url = '{sd}' AND NOT d.passed",
    )
    assert rows and all(r[1] == "resolution" and r[2] == 480 and r[3] == 720 for r in rows)
    drops = dict(
        _one(curated, "SELECT reason, count(*) FROM clips WHERE status <> 'accepted' GROUP BY ALL")
    )
    assert {"resolution", "aspect", "letterbox"} <= set(drops)
    # failed sources carry their reason; sources and clips join on source_id
    failed = dict(
        _one(curated, "SELECT reason, count(*) FROM sources WHERE status = 'failed' GROUP BY ALL")
    )
    assert {"empty", "not_video"} <= set(failed)
    (n,) = _one(
        curated,
        "SELECT count(*) FROM clips JOIN sources USING (source_id) WHERE sources.status = 'failed'",
    )[0]
    assert n == 0
    # re-tune a threshold by query: scores are kept for every clip
    (n480,) = _one(curated, "SELECT count(*) FROM clips WHERE short_side >= 480")[0]
    (n720,) = _one(curated, "SELECT count(*) FROM clips WHERE short_side >= 720")[0]
    assert n480 > n720


def test_query_cli_formats(curated, capsys):
    sql = "SELECT status, count(*) AS n FROM clips GROUP BY ALL ORDER BY status"
    assert main(["manifest", "query", str(curated), sql, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in data} >= {"accepted", "rejected"}
    assert main(["manifest", "query", str(curated), sql, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "status,n" and lines[1].startswith("accepted,")
    assert main(["manifest", "query", str(curated), sql]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["status", "|", "n"] and "rows)" in out
    assert main(["manifest", "query", str(curated), "SELECT * FROM nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_query_over_fsspec_url(curated, scheme):
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        for p in curated.rglob("*.parquet"):
            rel = p.relative_to(curated).as_posix()
            fs.pipe(f"/hdvg-test/out/{rel}", p.read_bytes())
        url = "memory://hdvg-test/out"
    else:
        url = curated.as_uri()
    local = dict(_one(curated, "SELECT status, count(*) FROM clips GROUP BY ALL"))
    assert dict(_one(url, "SELECT status, count(*) FROM clips GROUP BY ALL")) == local
    (n,) = _one(url, "SELECT count(*) FROM sources")[0]
    assert n == _one(curated, "SELECT count(*) FROM sources")[0][0]


def test_show_accepted_clip(curated, capsys):
    ((cid, url, sha, shard, off),) = _one(
        curated,
        "SELECT c.clip_id, c.source_url, s.sha256, c.shard, c.tar_offset FROM clips c "
        "JOIN sources s USING (source_id) WHERE c.status = 'accepted' ORDER BY 1 LIMIT 1",
    )
    assert main(["manifest", "show", str(curated), cid]) == 0
    out = capsys.readouterr().out
    for want in (f"clip {cid}: accepted", url, sha, shard, f"offset:   {off}", "method:",
                 "short_side", ">= 720", "pass", "pipeline: smoke", "filters:"):  # fmt: skip
        assert want in out, want
    lin = lineage(curated, cid)
    assert lin["clip"]["start_frame"] < lin["clip"]["end_frame"]
    assert lin["run"]["config"]["filters"]["resolution"]["min_short_side"] == 720
    assert all(d["passed"] for d in lin["decisions"])


def test_show_rejected_clip(curated, capsys):
    ((cid,),) = _one(curated, "SELECT clip_id FROM clips WHERE reason = 'resolution' LIMIT 1")
    assert main(["manifest", "show", str(curated), cid, "--format", "json"]) == 0
    lin = json.loads(capsys.readouterr().out)
    assert lin["clip"]["status"] == "rejected" and lin["clip"]["shard"] is None
    failed = [d for d in lin["decisions"] if not d["passed"]]
    assert failed[0]["column"] == "short_side" and failed[0]["threshold"] == 720
    assert main(["manifest", "show", str(curated), cid]) == 0
    assert "FAIL -> resolution" in capsys.readouterr().out
    with pytest.raises(ClipNotFound):
        lineage(curated, "0000000000000000_0000")
    assert main(["manifest", "show", str(curated), "nope_0000"]) == 2


def test_schema_version_mismatch_says_what_to_do(curated, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(curated / "manifest", out / "manifest")
    part = sorted((out / "manifest" / "clips").glob("part-*.parquet"))[0]
    t = pq.read_table(part)
    pq.write_table(t.replace_schema_metadata({"hdvg_schema_version": "99"}), part)
    with pytest.raises(SchemaVersionError, match="upgrade hdvg"):
        connect(out)
    assert main(["manifest", "query", str(out), "SELECT 1"]) == 2
    assert "CHANGELOG" in capsys.readouterr().err
    pq.write_table(t.replace_schema_metadata({"hdvg_schema_version": "0"}), part)
    with pytest.raises(SchemaVersionError, match="migrate"):
        connect(out)


def test_not_an_output(tmp_path, capsys):
    assert main(["manifest", "query", str(tmp_path), "SELECT 1"]) == 2
    assert "no manifest/" in capsys.readouterr().err


def test_query_is_read_only(curated, tmp_path, capsys):
    """Audits read; COPY / EXPORT / ATTACH / CREATE -- also behind EXPLAIN ANALYZE, which runs
    what it explains -- are refused before anything runs, so nothing is written anywhere."""
    target = tmp_path / "leak.csv"
    for sql in (
        f"COPY clips TO '{target}'",
        f"EXPLAIN ANALYZE COPY (SELECT * FROM clips) TO '{target}'",
        f"/* audit */ EXPLAIN (ANALYZE) COPY clips TO '{target}'",
        f"EXPORT DATABASE '{tmp_path / 'db'}'",
        f"ATTACH '{tmp_path / 'x.duckdb'}'",
        "CREATE TABLE t AS SELECT * FROM clips",
        "SELECT 1; SELECT 2",
    ):
        assert main(["manifest", "query", str(curated), sql]) == 2, sql
        assert "manifest query" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # what an audit does still runs: plans, descriptions, and joins with the auditor's own files
    ((url,),) = _one(curated, "SELECT source_url FROM sources LIMIT 1")
    (tmp_path / "urls.csv").write_text(f"url\n{url}\n")
    for sql in (
        "EXPLAIN ANALYZE SELECT count(*) FROM clips",
        "DESCRIBE clips",
        f"SELECT count(*) FROM sources JOIN read_csv('{tmp_path / 'urls.csv'}') u ON u.url = sources.source_url",
    ):  # fmt: skip
        assert main(["manifest", "query", str(curated), sql, "--format", "csv"]) == 0, sql
    assert capsys.readouterr().out.rstrip().endswith("\n1")
