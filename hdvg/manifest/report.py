"""`hdvg report OUT`: OUT/report.html, one self-contained page (plots as base64 PNG,
thumbnails as base64 JPEG decoded from the shards; no scripts, no external URLs), and
OUT/DATASET_CARD.md with the recipe and the counts."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..shards import staging_path
from .read import Out, connect, open_out
from .schema import CLIP_COLUMNS

DROPPED = ("rejected", "failed")


# --- data --------------------------------------------------------------------------------


def load(o: Out) -> dict[str, Any]:
    con = connect(o)
    clips = con.sql("SELECT * FROM clips ORDER BY clip_id").to_arrow_table().to_pylist()
    sources = con.sql('SELECT * FROM sources ORDER BY "order"').to_arrow_table().to_pylist()
    fixed = {n for n, _ in CLIP_COLUMNS}
    score_cols = [c for c in (clips[0] if clips else {}) if c not in fixed]
    return {"clips": clips, "sources": sources, "score_columns": score_cols,
            "run": o.read_json("run.json") or {}}  # fmt: skip


def counts(d: dict[str, Any]) -> dict[str, Any]:
    clips, sources = d["clips"], d["sources"]
    st = Counter(c["status"] for c in clips)
    acc = [c for c in clips if c["status"] == "accepted"]
    return {
        "sources": len(sources),
        "sources_by_status": dict(Counter(s["status"] for s in sources)),
        "sources_failed_by_reason": dict(
            Counter(s["reason"] for s in sources if s["status"] == "failed").most_common()
        ),
        "candidates": len(clips),
        "clips_by_status": dict(st),
        "accepted": st.get("accepted", 0),
        "removed": st.get("removed", 0),
        "drops_by_reason": dict(
            Counter(c["reason"] for c in clips if c["status"] in DROPPED).most_common()
        ),
        "accepted_hours": round(sum(c["duration_s"] or 0 for c in acc) / 3600, 4),
        "accepted_bytes": sum(c["size_bytes"] or 0 for c in acc),
        "shards": len({c["shard"] for c in acc if c["shard"]}),
        "captioned": sum(1 for c in acc if c["caption"]),
    }


# --- plots -------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _barh(title: str, items: list[tuple[str, int]], color: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * max(len(items), 2) + 0.9))
    if items:
        labels, values = zip(*items, strict=True)
        ax.barh(range(len(items)), values, color=color)
        ax.set_yticks(range(len(items)), labels)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v}", va="center")
    else:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_title(title)
    return _png(fig)


def _hist(title: str, xlabel: str, acc: list[float], drop: list[float]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    vals = [v for v in acc + drop if v is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        bins = 20 if hi > lo else 1
        rng = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        ax.hist([[v for v in acc if v is not None], [v for v in drop if v is not None]],
                bins=bins, range=rng, stacked=True, color=["#2b8a3e", "#c92a2a"],
                label=["accepted", "dropped"])  # fmt: skip
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clips")
    return _png(fig)


def plots(d: dict[str, Any], c: dict[str, Any]) -> list[tuple[str, str]]:
    clips = d["clips"]
    acc = [x for x in clips if x["status"] == "accepted"]
    drop = [x for x in clips if x["status"] in DROPPED]
    downloaded = c["sources_by_status"].get("downloaded", 0)
    out = [
        ("funnel", _barh("Funnel", [("sources", c["sources"]), ("downloaded", downloaded),
                                    ("candidate clips", c["candidates"]),
                                    ("accepted clips", c["accepted"])]  # fmt: skip
                         + ([("removed (takedown)", c["removed"])] if c["removed"] else []),
                         "#1c7ed6")),
        ("drops", _barh("Drops by reason",
                        [(f"clip: {k}", v) for k, v in c["drops_by_reason"].items()]
                        + [(f"source: {k}", v) for k, v in c["sources_failed_by_reason"].items()],
                        "#c92a2a")),
    ]  # fmt: skip

    def col(rows, f):
        return [f(x) for x in rows]

    def short(x):
        return min(x["width"], x["height"]) if x["width"] and x["height"] else None

    def aspect(x):
        return x["width"] / x["height"] if x["width"] and x["height"] else None

    def caplen(x):
        return len(x["caption"]) if x["caption"] else None

    specs = [
        ("duration", "Duration", "seconds", lambda x: x["duration_s"]),
        ("resolution", "Resolution (short side)", "pixels", short),
        ("aspect", "Aspect (width / height)", "ratio", aspect),
    ]
    specs += [(f"score-{s}", f"Score: {s}", s, lambda x, s=s: x[s]) for s in d["score_columns"]]
    specs.append(("caption-length", "Caption length", "characters", caplen))
    for key, title, xl, f in specs:
        out.append((key, _hist(title, xl, col(acc, f), col(drop, f))))
    return out


# --- thumbnails --------------------------------------------------------------------------


def thumbnail(o: Out, clip: dict[str, Any], width: int = 320) -> str | None:
    """The clip's middle frame as base64 JPEG, decoded from its bytes in the shard."""
    import av

    try:
        with o.fs.open(o.path("shards", clip["shard"]), "rb") as f:
            f.seek(clip["tar_offset"])
            data = f.read(clip["size_bytes"])
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                container.seek(stream.duration // 2, stream=stream)
            frame = next(container.decode(stream), None)
            if frame is None:
                return None
            img = frame.to_image()
    except (OSError, av.FFmpegError, StopIteration, ValueError):
        return None
    img.thumbnail((width, width))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


# --- page and card -----------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#212529}
h1{margin-bottom:4px} .sub{color:#868e96;margin-top:0}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #dee2e6;padding:4px 10px;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0;border:1px solid #e9ecef;padding:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px}
.grid figure{margin:0;border:1px solid #e9ecef;padding:6px}
.grid img{width:100%;height:auto;display:block;background:#000}
figcaption{font-size:12px;color:#495057;word-break:break-word}
code{background:#f1f3f5;padding:1px 4px}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def render_html(d: dict[str, Any], c: dict[str, Any], figs: list[tuple[str, str]],
                thumbs: list[tuple[dict[str, Any], str | None]]) -> str:  # fmt: skip
    run = d["run"]
    name = run.get("pipeline") or "hdvg dataset"
    rows = [
        ("sources", c["sources"]), ("sources by status", c["sources_by_status"]),
        ("candidate clips", c["candidates"]), ("clips by status", c["clips_by_status"]),
        ("accepted hours", c["accepted_hours"]), ("accepted bytes", c["accepted_bytes"]),
        ("shards", c["shards"]), ("captioned accepted clips", c["captioned"]),
        ("pipeline version", run.get("pipeline_version")), ("config hash", run.get("config_hash")),
    ]  # fmt: skip
    p = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(name)}: hdvg report</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_e(name)}</h1>",
        f'<p class="sub">{_e((run.get("config") or {}).get("description"))}</p>',
        '<h2>Counts</h2><table id="counts">',
        *(
            f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v) if isinstance(v, dict) else v)}</td></tr>"
            for k, v in rows
        ),  # fmt: skip
        "</table>",
        '<h2>Funnel and drops</h2><div class="plots">',
    ]
    for key, b64 in figs[:2]:
        p.append(f'<figure><img class="plot" id="plot-{_e(key)}" alt="{_e(key)}" '
                 f'src="data:image/png;base64,{b64}"></figure>')  # fmt: skip
    p.append('</div><h2>Distributions</h2><div class="plots">')
    for key, b64 in figs[2:]:
        p.append(f'<figure><img class="plot" id="plot-{_e(key)}" alt="{_e(key)}" '
                 f'src="data:image/png;base64,{b64}"></figure>')  # fmt: skip
    p.append(f"</div><h2>Sample clips ({len(thumbs)} of {c['accepted']} accepted)</h2>")
    p.append('<div class="grid" id="thumbnails">')
    for clip, b64 in thumbs:
        img = (f'<img class="thumb" alt="{_e(clip["clip_id"])}" src="data:image/jpeg;base64,{b64}">'
               if b64 else '<div class="nothumb">(could not decode)</div>')  # fmt: skip
        cap = clip["caption"] or "(no caption)"
        p.append(
            f"<figure>{img}<figcaption><b>{_e(clip['clip_id'])}</b> "
            f"{clip['width']}x{clip['height']} {clip['duration_s']:.1f}s<br>{_e(cap)}"
            "</figcaption></figure>"
        )
    p.append("</div>")
    p.append("<p>Lineage of a clip: <code>hdvg manifest show OUT CLIP_ID</code>; SQL: "
             "<code>hdvg manifest query OUT \"...\"</code>; integrity: "
             "<code>hdvg manifest verify OUT</code>.</p>")  # fmt: skip
    p.append("</body></html>")
    return "\n".join(p) + "\n"


def _md_table(head: tuple[str, str], items: list[tuple[Any, Any]]) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "| --- | ---: |",
            *(f"| {k} | {v} |" for k, v in items)]  # fmt: skip


def render_card(d: dict[str, Any], c: dict[str, Any]) -> str:
    run = d["run"]
    cfg = run.get("config") or {}
    name = run.get("pipeline") or "hdvg dataset"
    st = c["clips_by_status"]
    L = [f"# Dataset card: {name}", ""]
    if cfg.get("description"):
        L += [cfg["description"], ""]
    L += ["Curated with [hdvg](https://github.com/hdvg/hdvg) into WebDataset shards "
          "(`shards/shard-*.tar`: `{key}.mp4`, `{key}.txt` caption, `{key}.json` manifest row) "
          "and Parquet manifests (`manifest/clips`, `manifest/sources`).", ""]  # fmt: skip
    L += ["## Counts", ""]
    L += _md_table(("what", "count"), [
        ("sources", c["sources"]),
        *((f"sources {k}", v) for k, v in sorted(c["sources_by_status"].items())),
        ("candidate clips", c["candidates"]),
        *((f"clips {k}", v) for k, v in sorted(st.items())),
        ("accepted hours", c["accepted_hours"]),
        ("accepted bytes", c["accepted_bytes"]),
        ("shards", c["shards"]),
        ("accepted clips with a caption", c["captioned"]),
    ])  # fmt: skip
    L += ["", "## Drops by reason", ""]
    drops = [(f"clip `{k}`", v) for k, v in c["drops_by_reason"].items()]
    drops += [(f"source `{k}`", v) for k, v in c["sources_failed_by_reason"].items()]
    L += _md_table(("reason", "count"), drops) if drops else ["None."]
    L += ["", "## Recipe", ""]
    L += [f"- pipeline: `{name}`, version `{run.get('pipeline_version')}`, "
          f"config hash `{run.get('config_hash')}`",
          f"- input: `{run.get('input')}`",
          f"- score columns: {', '.join(f'`{s}`' for s in d['score_columns']) or 'none'}"]  # fmt: skip
    vers = run.get("versions") or {}
    if vers:
        L.append("- software: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items())))
    for section in ("scenes", "cut", "filters", "clip_stages"):
        if cfg.get(section):
            L += ["", f"### {section}", "", "```json", json.dumps(cfg[section], indent=2,
                                                                   sort_keys=True), "```"]  # fmt: skip
    L += ["", "The full resolved config is in `run.json`; thresholds live in the recipe and "
          "scores in the manifest, so a threshold can be re-tuned with a query.", ""]  # fmt: skip
    L += ["## Lineage, audit and takedowns", "",
          "- `hdvg manifest show OUT CLIP_ID`: source URL and hash, cut, every score against "
          "its threshold, caption model, shard and byte offset.",
          "- `hdvg manifest query OUT \"SQL\"` over the tables `clips` and `sources`.",
          "- `hdvg manifest verify OUT`: shard bytes against offsets, sizes and sha256.",
          f"- `hdvg manifest takedown OUT --source URL`: {c['removed']} clips removed so far "
          "(rows kept with `status = 'removed'`, `removed_at`, `removed_reason`).", ""]  # fmt: skip
    return "\n".join(L)


def _write(o: Out, name: str, text: str) -> str:
    path = o.path(name)
    if o.local:
        tmp = staging_path(Path(path))
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    else:
        with o.fs.open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return o.url_of(path)


def write_report(out: str | Path | Out, thumbnails: int = 24) -> tuple[str, str]:
    o = out if isinstance(out, Out) else open_out(out)
    d = load(o)
    c = counts(d)
    figs = plots(d, c)
    acc = [x for x in d["clips"] if x["status"] == "accepted" and x["shard"]]
    step = max(1, len(acc) // max(thumbnails, 1))  # spread the samples over the dataset
    picked = acc[::step][:thumbnails] if thumbnails > 0 else []
    thumbs = [(x, thumbnail(o, x)) for x in picked]
    page = _write(o, "report.html", render_html(d, c, figs, thumbs))
    card = _write(o, "DATASET_CARD.md", render_card(d, c))
    return page, card
