"""The dataset writer: shards + manifest parts, committed together, resumable.

Commit protocol (see DESIGN.md "Invariants"): a shard only ever holds whole sources; when
it closes, its tar and the manifest parts holding the rows of its sources are written to
hidden temporary names (`.{name}.tmp`, see `staging_path`), then the shard is renamed, then
the parts. On restart, `.tmp` files and shards that no manifest part references are
deleted, and sources with committed rows are skipped: a killed run, rerun, finishes the
work without duplicates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..records import Clip, SourceRecord, SourceResult
from ..shards import ShardWriter, staging_path
from .schema import SCHEMA_VERSION, clips_schema, sources_schema

PART_RE = re.compile(r"part-(\d{6})\.parquet$")
SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")
FLUSH_EVERY = 64  # sources without accepted clips are committed in parts of this many


def clip_row(clip: Clip, meta: dict[str, str], score_columns: list[str]) -> dict[str, Any]:
    row = {
        k: getattr(clip, k)
        for k in (
            "clip_id", "source_id", "source_url", "clip_index", "start_s", "end_s",
            "start_frame", "end_frame", "duration_s", "width", "height", "fps", "codec",
            "cut_method", "status", "reason", "reasons", "error", "caption", "caption_model",
            "source_clip_id", "source_caption", "shard", "tar_offset", "size_bytes", "sha256",
        )
    }  # fmt: skip
    row["decisions"] = json.dumps([dataclasses.asdict(d) for d in clip.decisions])
    for c in score_columns:
        if c not in row:
            v = clip.scores.get(c)
            row[c] = None if v is None else float(v)
    row.update(meta, schema_version=SCHEMA_VERSION, removed_at=None, removed_reason=None)
    return row


def source_row(rec: SourceRecord, meta: dict[str, str]) -> dict[str, Any]:
    p = rec.probe
    row = {
        "source_id": rec.source_id, "source_url": rec.source_url, "order": rec.order,
        "status": rec.status, "reason": rec.reason, "error": rec.error,
        "input_id": rec.input_id, "input_caption": rec.input_caption,
        "size_bytes": rec.size_bytes, "sha256": rec.sha256,
        "n_frames": rec.n_frames, "n_scenes": rec.n_scenes, "n_clips": rec.n_clips,
        "n_accepted": rec.n_accepted, "timings": json.dumps(rec.timings, sort_keys=True),
        "schema_version": SCHEMA_VERSION, **meta,
    }  # fmt: skip
    for k in ("container", "codec", "width", "height", "coded_width", "coded_height",
              "rotation", "sar", "dar", "fps", "vfr", "duration_s", "start_time_s",
              "bitrate", "has_audio"):  # fmt: skip
        row[k] = getattr(p, k) if p is not None else None
    return row


class Ledger:
    """What earlier runs committed to OUT (read at start, for resume)."""

    def __init__(self, out: Path):
        self.out = out
        self.done_sources: dict[str, str] = {}  # source_id -> status
        self.next_shard = 0
        self.next_part = 0
        referenced: set[str] = set()
        for d in ("clips", "sources"):
            for p in sorted((out / "manifest" / d).glob("*.tmp")):
                p.unlink()
        # a part counts only when both its clips and sources halves were renamed
        halves = {d: {p.name for p in (out / "manifest" / d).glob("part-*.parquet")}
                  for d in ("clips", "sources")}  # fmt: skip
        for d, other in (("clips", "sources"), ("sources", "clips")):
            for name in halves[d] - halves[other]:
                (out / "manifest" / d / name).unlink()
        for p in sorted((out / "manifest" / "clips").glob("part-*.parquet")):
            m = PART_RE.search(p.name)
            self.next_part = max(self.next_part, int(m.group(1)) + 1)
            t = pq.read_table(p, columns=["shard"])
            referenced.update(s for s in t.column("shard").to_pylist() if s)
        for p in sorted((out / "manifest" / "sources").glob("part-*.parquet")):
            m = PART_RE.search(p.name)
            self.next_part = max(self.next_part, int(m.group(1)) + 1)
            t = pq.read_table(p, columns=["source_id", "status"])
            for sid, st in zip(
                t.column("source_id").to_pylist(), t.column("status").to_pylist(), strict=False
            ):
                self.done_sources[sid] = st
        # clips (and their extras) spooled for a shard that never committed: their sources
        # are redone
        for p in sorted((out / ".work" / "spool").glob("*")):
            p.unlink()
        shard_dir = out / "shards"
        for p in sorted(shard_dir.glob("*.tmp")):
            p.unlink()
        for p in sorted(shard_dir.glob("shard-*.tar")):
            if p.name not in referenced:  # renamed, but its manifest part never was: orphan
                p.unlink()
                continue
            self.next_shard = max(self.next_shard, int(SHARD_RE.search(p.name).group(1)) + 1)


class DatasetWriter:
    def __init__(
        self, out: str | Path, meta: dict[str, str], score_columns: list[str],
        max_samples: int = 1000, max_bytes: int = 1024**3, mtime: int = 0,
        ledger: Ledger | None = None,
    ):  # fmt: skip
        self.out = Path(out)
        self.meta = meta
        self.score_columns = score_columns
        self.max_samples, self.max_bytes, self.mtime = max_samples, max_bytes, mtime
        self.ledger = ledger or Ledger(self.out)
        self.shard_index = self.ledger.next_shard
        self.part_index = self.ledger.next_part
        # (key, spooled mp4, caption, row, spooled extras by member name)
        self.pending: list[tuple[str, Path, str, dict[str, Any], dict[str, Path]]] = []
        self.pending_bytes = 0
        self.clip_rows: list[dict[str, Any]] = []
        self.source_rows: list[dict[str, Any]] = []
        self.shards_written: list[str] = []
        (self.out / "manifest" / "clips").mkdir(parents=True, exist_ok=True)
        (self.out / "manifest" / "sources").mkdir(parents=True, exist_ok=True)
        (self.out / "shards").mkdir(parents=True, exist_ok=True)

    def add(self, result: SourceResult) -> None:
        accepted = [c for c in result.clips if c.alive and c.data]
        if accepted:
            size = sum(len(c.data) + sum(map(len, c.extras.values())) for c in accepted)
            if self.pending and (
                len(self.pending) + len(accepted) > self.max_samples
                or self.pending_bytes + size > self.max_bytes
            ):
                self.commit()
        spool = self.out / ".work" / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        for clip in result.clips:
            if clip.alive and clip.data:
                # spooled to disk until the shard closes: the tar is written in key order
                # (members sorted across the whole shard) without holding clips in memory
                clip.sha256 = hashlib.sha256(clip.data).hexdigest()
                path = spool / f"{clip.clip_id}.mp4"
                path.write_bytes(clip.data)
                self.pending_bytes += len(clip.data)
                extras = {}
                for name, blob in sorted(clip.extras.items()):
                    extras[name] = spool / f"{clip.clip_id}.{name}"
                    extras[name].write_bytes(blob)
                    self.pending_bytes += len(blob)
                clip.data, clip.extras = None, {}
                # {key}.txt: the model's caption, else the one the input gave (HD-VG-130M's
                # released caption, an input list's caption column)
                text = clip.caption or clip.source_caption or ""
                self.pending.append((clip.clip_id, path, text,
                                     clip_row(clip, self.meta, self.score_columns), extras))  # fmt: skip
            else:
                clip.data, clip.extras = None, {}
                self.clip_rows.append(clip_row(clip, self.meta, self.score_columns))
        self.source_rows.append(source_row(result.source, self.meta))
        if not self.pending and len(self.source_rows) >= FLUSH_EVERY:
            self.commit()

    def commit(self) -> None:
        """Make the current shard and all pending rows durable, atomically enough to resume."""
        if not self.source_rows and not self.pending:
            return
        shard = None
        if self.pending:
            shard = ShardWriter(self.out / "shards", self.shard_index, self.mtime)
            self.shard_index += 1
            for key, path, caption, row, extras in sorted(self.pending, key=lambda p: p[0]):
                blobs = {name: p.read_bytes() for name, p in extras.items()}
                self.clip_rows.append(shard.add(key, path.read_bytes(), caption, row, blobs))
            shard.close()
        part = f"part-{self.part_index:06d}.parquet"
        self.part_index += 1
        clips_final = self.out / "manifest" / "clips" / part
        sources_final = self.out / "manifest" / "sources" / part
        clips_tmp, sources_tmp = staging_path(clips_final), staging_path(sources_final)
        rows = sorted(self.clip_rows, key=lambda r: r["clip_id"])
        pq.write_table(
            pa.Table.from_pylist(rows, schema=clips_schema(self.score_columns)), clips_tmp
        )
        pq.write_table(pa.Table.from_pylist(self.source_rows, schema=sources_schema()), sources_tmp)
        if shard is not None:
            shard.commit()
            self.shards_written.append(shard.name)
        os.replace(clips_tmp, clips_final)
        os.replace(sources_tmp, sources_final)
        for _, path, _, _, extras in self.pending:
            for p in (path, *extras.values()):
                p.unlink(missing_ok=True)
        self.clip_rows, self.source_rows, self.pending, self.pending_bytes = [], [], [], 0

    def close(self) -> None:
        self.commit()


def drop_failed_sources(out: Path, ledger: Ledger) -> list[str]:
    """For `--retry-failed`: remove the rows of failed sources so they are processed again.

    Failed sources have no clips in any shard, so only manifest parts are rewritten (each to
    a temporary name, then renamed).
    """
    failed = {sid for sid, st in ledger.done_sources.items() if st == "failed"}
    if not failed:
        return []
    for d in ("sources", "clips"):
        for p in sorted((out / "manifest" / d).glob("part-*.parquet")):
            t = pq.read_table(p)
            keep = [sid not in failed for sid in t.column("source_id").to_pylist()]
            if all(keep):
                continue
            tmp = staging_path(p, "rewrite")
            pq.write_table(t.filter(pa.array(keep)), tmp)
            os.replace(tmp, p)
    return sorted(failed)
