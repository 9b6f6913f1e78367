"""`hdvg manifest takedown OUT --source URL | --clip ID [--reason TEXT]`.

Removes clips from the shards and marks their rows, so that `verify` stays clean:

1. every shard that holds a target clip is rewritten without it, with the same
   conventions as `hdvg.shards.ShardWriter` (it is reused: sorted members, the original
   mtime, fresh `tar_offset`s in the kept samples' `{key}.json`), to a temporary name;
2. every manifest part whose rows change is written to a temporary name: accepted
   targets become `status = 'removed'` with `tar_offset` null (their bytes are gone), every
   target row (rejected and failed ones of a taken-down source too) gets `removed_at` and
   `removed_reason`, and kept rows of rewritten shards get their new `tar_offset`;
3. the shards are renamed into place, then the parts.

Rerunning is safe and finishes an interrupted takedown: shards are rewritten only while
they still hold a target, and offsets are always re-read from the shards as they are.
`sha256`, `size_bytes` and `shard` of removed rows are kept as the record of what was
removed and where it was. Sources rows stay (a rerun of `hdvg curate` then skips the source
instead of downloading it again). Do not run a takedown while `hdvg curate` writes to OUT.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..shards import ShardWriter, staging_path
from .read import Out, connect, open_out

SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")


class TakedownError(RuntimeError):
    pass


@dataclass
class TakedownResult:
    removed: list[str] = field(default_factory=list)  # accepted clips taken out of shards
    marked: list[str] = field(default_factory=list)  # rejected/failed rows marked only
    already: list[str] = field(default_factory=list)  # removed by an earlier takedown
    shards_rewritten: list[str] = field(default_factory=list)
    parts_rewritten: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"takedown: {len(self.removed)} clips removed from shards, {len(self.marked)} "
            f"rejected/failed rows marked, {len(self.already)} already removed; shards "
            f"rewritten: {', '.join(self.shards_rewritten) or 'none'}; manifest parts "
            f"rewritten: {len(self.parts_rewritten)}"
        )


def _samples(tf: tarfile.TarFile):
    """(key, {ext: TarInfo}) in tar order; members of one sample sit together."""
    cur, group = None, {}
    for ti in tf:
        if not ti.isreg():
            raise TakedownError(f"{tf.name}: non-file member {ti.name!r}; run verify first")
        key, _, ext = ti.name.partition(".")
        if key != cur and group:
            yield cur, group
            group = {}
        cur = key
        group[ext] = ti
    if group:
        yield cur, group


def mp4_offsets(path: Path) -> tuple[dict[str, int], int]:
    """Key -> mp4 data offset, and the shard's member mtime (kept when rewriting)."""
    with tarfile.open(path, mode="r:") as tf:
        members = tf.getmembers()
    mtime = int(members[0].mtime) if members else 0
    return {ti.name[:-4]: ti.offset_data for ti in members if ti.name.endswith(".mp4")}, mtime


def rewrite_shard(path: Path, drop: set[str], mtime: int) -> tuple[ShardWriter, dict[str, int]]:
    """Write `path` without the samples in `drop` to `.{name}.tmp`; returns the (closed, not
    yet committed) writer and the new mp4 offsets of the kept samples."""
    m = SHARD_RE.search(path.name)
    if not m:
        raise TakedownError(f"unexpected shard name {path.name}")
    offsets: dict[str, int] = {}
    with tarfile.open(path, mode="r:") as tf:
        w = ShardWriter(path.parent, int(m.group(1)), mtime)
        try:
            for key, group in _samples(tf):
                if key in drop:
                    continue
                if not {"json", "mp4", "txt"} <= set(group):
                    raise TakedownError(
                        f"{path.name}: sample {key} has members {sorted(group)}; run verify first"
                    )
                row = json.loads(tf.extractfile(group["json"]).read())
                mp4 = tf.extractfile(group["mp4"]).read()
                caption = tf.extractfile(group["txt"]).read().decode()
                extras = {ext: tf.extractfile(ti).read() for ext, ti in group.items()
                          if ext not in ("json", "mp4", "txt")}  # fmt: skip
                offsets[key] = w.add(key, mp4, caption, row, extras)["tar_offset"]
            w.close()
        except BaseException:
            w.abort()
            raise
    return w, offsets


def takedown(
    out: str | Path | Out,
    *,
    sources: list[str] = (),
    clips: list[str] = (),
    reason: str | None = None,
    now: str | None = None,
) -> TakedownResult:
    o = out if isinstance(out, Out) else open_out(out)
    if not o.local:
        raise TakedownError(f"{o.url}: takedown rewrites files in place; run it on a local OUT")
    root = Path(o.root)
    now = now or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reason = reason or "takedown request"
    con = connect(o)
    rows = con.execute(
        "SELECT clip_id, source_id, source_url, status, shard, removed_at FROM clips "
        "WHERE source_url IN (SELECT unnest($1::VARCHAR[])) "
        "OR source_id IN (SELECT unnest($1::VARCHAR[])) "
        "OR clip_id IN (SELECT unnest($2::VARCHAR[]))",
        [list(sources), list(clips)],
    ).fetchall()
    found_src = {r[2] for r in rows} | {r[1] for r in rows}
    found_clip = {r[0] for r in rows}
    missing = [s for s in sources if s not in found_src] + [c for c in clips if c not in found_clip]
    if missing:
        raise TakedownError(f"not in the manifest: {', '.join(missing)} (nothing was changed)")
    res = TakedownResult()
    targets = {r[0] for r in rows}
    for cid, _sid, _url, status, _shard, removed_at in sorted(rows):
        if removed_at:
            res.already.append(cid)
        elif status == "accepted":
            res.removed.append(cid)
        else:
            res.marked.append(cid)

    # 1. shards still holding a target: rewrite to .tmp; every touched shard's offsets
    shard_names = sorted({r[4] for r in rows if r[4]})
    writers: list[ShardWriter] = []
    offsets: dict[str, dict[str, int]] = {}
    try:
        for name in shard_names:
            path = root / "shards" / name
            if not path.exists():
                continue
            now_offsets, mtime = mp4_offsets(path)
            if targets & set(now_offsets):
                w, offsets[name] = rewrite_shard(path, targets, mtime)
                writers.append(w)
            else:
                offsets[name] = now_offsets
        # 2. manifest parts, to .tmp
        part_tmps: list[tuple[Path, Path]] = []
        for p in o.parts("clips"):
            p = Path(p)
            t = pq.read_table(p)
            data = t.to_pylist()
            changed = False
            for row in data:
                cid = row["clip_id"]
                if cid in targets:
                    new = dict(row, removed_at=row["removed_at"] or now,
                               removed_reason=row["removed_reason"] or reason)  # fmt: skip
                    if row["status"] in ("accepted", "removed"):
                        new.update(status="removed", tar_offset=None)
                elif row["status"] == "accepted" and row["shard"] in offsets:
                    off = offsets[row["shard"]].get(cid)
                    new = dict(row, tar_offset=off) if off is not None else row
                else:
                    continue
                if new != row:
                    row.update(new)
                    changed = True
            if changed:
                tmp = staging_path(p, "takedown")
                pq.write_table(pa.Table.from_pylist(data, schema=t.schema), tmp)
                part_tmps.append((tmp, p))
    except BaseException:
        for w in writers:
            w.tmp.unlink(missing_ok=True)
        raise
    # 3. rename: shards first, then parts (an interruption here is finished by a rerun)
    for w in writers:
        w.commit()
        res.shards_rewritten.append(w.name)
    for tmp, final in part_tmps:
        os.replace(tmp, final)
        res.parts_rewritten.append(final.name)
    return res
