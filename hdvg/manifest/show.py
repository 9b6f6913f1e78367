"""`hdvg manifest show OUT CLIP_ID`: the full lineage of one clip, from its manifest row,
its source's row and the run's resolved config (OUT/run.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .read import Out, connect, open_out
from .schema import CLIP_COLUMNS


class ClipNotFound(LookupError):
    pass


def lineage(out: str | Path | Out, clip_id: str) -> dict[str, Any]:
    o = out if isinstance(out, Out) else open_out(out)
    con = connect(o)
    cur = con.execute("SELECT * FROM clips WHERE clip_id = ?", [clip_id])
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    if not rows:
        hint = con.execute(
            "SELECT clip_id FROM clips WHERE clip_id LIKE ? ORDER BY clip_id LIMIT 5",
            [clip_id.split("_")[0] + "%"],
        ).fetchall()
        more = f"; similar: {', '.join(h[0] for h in hint)}" if hint else ""
        raise ClipNotFound(f"no clip {clip_id!r} in {o.url}{more}")
    clip = dict(zip(cols, rows[-1], strict=True))
    cur = con.execute("SELECT * FROM sources WHERE source_id = ?", [clip["source_id"]])
    scols = [d[0] for d in cur.description]
    srow = cur.fetchone()
    source = dict(zip(scols, srow, strict=True)) if srow else None
    fixed = {n for n, _ in CLIP_COLUMNS}
    scores = {c: clip[c] for c in cols if c not in fixed}
    run = o.read_json("run.json") or {}
    config = run.get("config") if run.get("config_hash") == clip.get("config_hash") else None
    return {
        "clip": clip,
        "decisions": json.loads(clip.get("decisions") or "[]"),
        "scores": scores,
        "source": source,
        "run": {
            "pipeline": run.get("pipeline"),
            "pipeline_version": clip.get("pipeline_version"),
            "config_hash": clip.get("config_hash"),
            "config": config,
            "config_note": None if config else "OUT/run.json has another config_hash (or none)",
            "versions": run.get("versions"),
        },
        "duplicates": len(rows) - 1,
    }


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-3 and v != 0 else f"{round(v, nd)}"
    return str(v)


def format_text(lin: dict[str, Any]) -> str:
    c, s, r = lin["clip"], lin["source"], lin["run"]
    verdict = c["status"] + (f" ({c['reason']})" if c.get("reason") else "")
    out = [f"clip {c['clip_id']}: {verdict}"]
    if c.get("removed_at"):
        out.append(f"  REMOVED at {c['removed_at']}: {c.get('removed_reason') or '-'}")
    if c.get("error"):
        out.append(f"  error: {c['error']}")
    out.append("source")
    out.append(f"  url:      {c['source_url']}")
    out.append(f"  id:       {c['source_id']}")
    if s:
        out.append(f"  sha256:   {s.get('sha256') or '-'}  ({_f(s.get('size_bytes'))} bytes)")
        out.append(
            f"  probe:    {s.get('width')}x{s.get('height')} {s.get('codec')} "
            f"{_f(s.get('fps'))} fps {_f(s.get('duration_s'))} s, status {s.get('status')}"
            + (f" ({s['reason']})" if s.get("reason") else "")
        )
        if s.get("input_id") or s.get("input_caption"):
            out.append(f"  input:    id {s.get('input_id')}, caption {s.get('input_caption')!r}")
    else:
        out.append("  (no sources row for this source_id)")
    out.append("cut")
    out.append(
        f"  seconds:  {_f(c['start_s'])} - {_f(c['end_s'])} (duration {_f(c['duration_s'])} s)"
    )
    out.append(f"  frames:   {c['start_frame']} - {c['end_frame']} (end exclusive)")
    out.append(f"  method:   {c.get('cut_method') or '-'}")
    out.append(
        f"  written:  {c.get('width')}x{c.get('height')} {c.get('codec') or '-'} "
        f"{_f(c.get('fps'))} fps"
    )
    out.append("decisions (score vs threshold)")
    if lin["decisions"]:
        for d in lin["decisions"]:
            mark = "pass" if d["passed"] else f"FAIL -> {d['reason']}"
            out.append(
                f"  {d['stage']:<12} {d['column']:<20} {_f(d['score']):>12} {d['op']} "
                f"{_f(d['threshold']):<10} {mark}"
            )
    else:
        out.append("  (none recorded)")
    out.append("scores")
    for k, v in lin["scores"].items():
        out.append(f"  {k:<24} {_f(v)}")
    out.append("caption")
    out.append(f"  text:     {c.get('caption')!r}")
    out.append(f"  model:    {c.get('caption_model') or '-'}")
    if c.get("source_clip_id") or c.get("source_caption"):
        out.append(f"  released: {c.get('source_clip_id')} {c.get('source_caption')!r}")
    out.append("storage")
    out.append(f"  shard:    {c.get('shard') or '-'}")
    out.append(f"  offset:   {_f(c.get('tar_offset'))}  size {_f(c.get('size_bytes'))} bytes")
    out.append(f"  sha256:   {c.get('sha256') or '-'}")
    out.append("produced by")
    out.append(f"  pipeline: {r.get('pipeline') or '-'} ({r['pipeline_version']})")
    out.append(f"  config:   {r['config_hash']}")
    cfg = r.get("config")
    if cfg:
        for section in ("scenes", "cut", "filters", "clip_stages"):
            if cfg.get(section):
                out.append(f"  {section + ':':<9} {json.dumps(cfg[section], sort_keys=True)}")
        out.append("  (full resolved config: OUT/run.json)")
    elif r.get("config_note"):
        out.append(f"  ({r['config_note']})")
    if lin["duplicates"]:
        out.append(f"WARNING: {lin['duplicates'] + 1} rows share this clip_id (see verify)")
    return "\n".join(out)
