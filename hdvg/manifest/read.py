"""The shared manifest reader: where an OUT's parts lie (local or any fsspec URL), whether
this hdvg can read their schema version, and a DuckDB connection with `clips` and
`sources` views over them. Every auditor command goes through here.

`python -m hdvg.manifest.read` rewrites `manifests/schema/{clips,sources}.v<N>.json` from
`schema.py` (a test checks they agree).
"""

from __future__ import annotations

import json
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import CLIP_COLUMNS, SCHEMA_VERSION, SOURCE_COLUMNS, clips_schema, sources_schema

TABLES = ("clips", "sources")
CHANGELOG = "manifests/CHANGELOG.md"


class ManifestError(RuntimeError):
    """OUT has no readable manifest (missing, or a schema version this hdvg cannot read)."""


class SchemaVersionError(ManifestError):
    pass


@dataclass
class Out:
    """An output folder: a local path or an fsspec URL (`s3://bucket/run`, `memory://x`)."""

    url: str
    fs: Any  # fsspec.AbstractFileSystem
    root: str  # path inside `fs`, no trailing slash

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, path: str) -> str:
        """A URL DuckDB can open: a plain path locally, `proto://path` otherwise."""
        return path if self.local else f"{_protocols(self.fs)[0]}://{path}"

    def parts(self, table: str) -> list[str]:
        return sorted(self.fs.glob(self.path("manifest", table, "part-*.parquet")))

    def shards(self) -> list[str]:
        return sorted(self.fs.glob(self.path("shards", "shard-*.tar")))

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        p = self.path(*parts)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return json.loads(f.read())


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def open_out(out: str | Path) -> Out:
    fs, root = fsspec.core.url_to_fs(str(out))
    root = root.rstrip("/") or "/"
    if not fs.isdir(posixpath.join(root, "manifest")):
        raise ManifestError(f"{out}: no manifest/ folder; is this the --output of `hdvg curate`?")
    return Out(str(out), fs, root)


def part_version(o: Out, path: str) -> int:
    meta = pq.read_schema(path, filesystem=o.fs).metadata or {}
    v = meta.get(b"hdvg_schema_version")
    if v is None:
        raise SchemaVersionError(
            f"{path}: not an hdvg manifest part (no hdvg_schema_version in its Parquet metadata)"
        )
    return int(v)


def check_versions(o: Out) -> int:
    """Every part must carry the schema version this hdvg reads; else say what to do."""
    for table in TABLES:
        for p in o.parts(table):
            v = part_version(o, p)
            if v > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{p}: manifest schema v{v} is newer than this hdvg reads (v{SCHEMA_VERSION}); "
                    f"upgrade hdvg (`pip install -U hdvg`), or use the version named in its "
                    f"pipeline_version column; changes are listed in {CHANGELOG}"
                )
            if v < SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{p}: manifest schema v{v} is older than this hdvg reads (v{SCHEMA_VERSION}); "
                    f"migrate the parts as {CHANGELOG} describes for v{v} -> v{SCHEMA_VERSION}, "
                    f"or read them with the hdvg named in their pipeline_version column"
                )
    return SCHEMA_VERSION


def connect(out: str | Path | Out):
    """A DuckDB connection with views `clips` and `sources` over OUT's manifest parts."""
    import duckdb

    o = out if isinstance(out, Out) else open_out(out)
    check_versions(o)
    con = duckdb.connect()
    if not o.local:
        con.register_filesystem(o.fs)
    for table, empty in (("clips", clips_schema([])), ("sources", sources_schema())):
        parts = o.parts(table)
        if parts:
            files = ", ".join("'" + o.url_of(p).replace("'", "''") + "'" for p in parts)
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}], union_by_name=true)"
            )
        else:  # an OUT with no rows yet still answers queries (with no rows)
            con.register(f"_{table}_empty", empty.empty_table())
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM _{table}_empty")
    return con


def read_table(o: Out, table: str) -> pa.Table:
    """All parts of one table as Arrow (columns unioned by name)."""
    con = connect(o)
    return con.sql(f"SELECT * FROM {table}").to_arrow_table()


# --- the versioned schema files under manifests/schema --------------------------------

CLIP_DOCS = {
    "clip_id": "= WebDataset key: {source_id}_{clip_index:04d}",
    "source_id": "stable hash of source_url (first 16 hex of sha256)",
    "source_url": "the input as given (path or URL)",
    "clip_index": "index of the clip within its source",
    "start_s": "cut start, seconds from the source's first frame",
    "end_s": "cut end, seconds",
    "start_frame": "first frame of the clip in the decoded source",
    "end_frame": "one past the last frame (exclusive)",
    "duration_s": "of the clip as written",
    "width": "display width of the clip as written",
    "height": "display height of the clip as written",
    "fps": "average frame rate",
    "codec": "video codec of the clip as written",
    "cut_method": "copy (the source's packets, from a keyframe) or reencode",
    "status": "accepted | rejected | failed | removed (by takedown)",
    "reason": "null when accepted; a stable code otherwise (first failed check)",
    "reasons": "every failed check's code",
    "error": "error text of a failed clip",
    "decisions": "JSON [{stage, column, score, op, threshold, passed, reason}]",
    "caption": "caption text",
    "caption_model": "model that wrote the caption (name + revision)",
    "source_clip_id": "released clip id when the input was HD-VG-130M metadata",
    "source_caption": "the input's caption: HD-VG-130M's released one, or a list's caption column",
    "shard": "shard file name under OUT/shards",
    "tar_offset": "byte offset of the mp4 member's data in the shard (null once removed)",
    "size_bytes": "size of the mp4",
    "sha256": "sha256 of the mp4",
    "pipeline_version": "hdvg version that produced the row",
    "config_hash": "hash of the resolved pipeline config (OUT/run.json)",
    "schema_version": "manifest schema version of the row",
    "removed_at": "UTC time of the takedown that removed the clip",
    "removed_reason": "why it was taken down",
}


def _type_name(t: pa.DataType) -> str:
    return str(t)


def schema_document(table: str) -> dict[str, Any]:
    cols = CLIP_COLUMNS if table == "clips" else SOURCE_COLUMNS
    docs = CLIP_DOCS if table == "clips" else {}
    doc: dict[str, Any] = {
        "table": table,
        "schema_version": SCHEMA_VERSION,
        "parquet_metadata": {"hdvg_schema_version": str(SCHEMA_VERSION)},
        "columns": [
            {"name": n, "type": _type_name(t), **({"doc": docs[n]} if n in docs else {})}
            for n, t in cols
        ],
    }
    if table == "clips":
        doc["score_columns"] = {
            "type": "double",
            "doc": "one more column per score the pipeline's stages declare (e.g. "
            "short_side, aspect_error, letterbox_fraction, watermark_score, clip_score); "
            "kept for every clip, accepted ones too",
        }
    return doc


def schema_path(root: Path, table: str) -> Path:
    return root / "manifests" / "schema" / f"{table}.v{SCHEMA_VERSION}.json"


def write_schema_files(root: Path) -> list[Path]:
    written = []
    for table in TABLES:
        p = schema_path(root, table)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(schema_document(table), indent=2) + "\n")
        written.append(p)
    return written


if __name__ == "__main__":
    for p in write_schema_files(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(p)
