"""`hdvg manifest verify OUT`: the shards and the manifest agree, byte for byte.

Checks, per accepted row: its shard exists, holds `{key}.mp4` whose data starts at the
row's `tar_offset` and is `size_bytes` long, the bytes there hash to `sha256`, and the
sample's `{key}.json` / `{key}.txt` are present and agree; the extra members a stage added
(`{key}.latents.npy`, ...) are exactly those its `{key}.json` lists under `extras`. Per
shard: every member belongs to an accepted row of that shard, and the tar is complete (every
member's data inside the file, and the end-of-archive blocks after the last one). Tar
headers are parsed, never extracted.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .read import Out, connect, open_out

BLOCK = 512
EXTS = ("json", "mp4", "txt")
KINDS = ("missing", "extra", "corrupt", "truncated", "manifest")


@dataclass
class Problem:
    kind: str  # one of KINDS
    shard: str | None
    clip_id: str | None
    detail: str

    def __str__(self) -> str:
        where = " ".join(x for x in (self.shard, self.clip_id) if x)
        return f"{self.kind:<9} {where}: {self.detail}"


@dataclass
class Member:
    offset_data: int
    size: int


@dataclass
class VerifyReport:
    out: str
    shards: int = 0
    rows_checked: int = 0
    members: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def scan_shard(f: Any, size: int, name: str, problems: list[Problem]) -> dict[str, Member]:
    """Member name -> data offset and size; structural problems appended to `problems`."""
    members: dict[str, Member] = {}
    end = 0  # end of the last member's padded data
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for ti in tf:
                end = max(end, ti.offset_data + _padded(ti.size))
                if not ti.isreg():
                    problems.append(Problem("extra", name, None, f"non-file member {ti.name!r}"))
                    continue
                if ti.offset_data + ti.size > size:
                    problems.append(Problem(
                        "truncated", name, ti.name.split(".")[0],
                        f"member {ti.name} needs bytes up to {ti.offset_data + ti.size}, "
                        f"shard has {size}",
                    ))  # fmt: skip
                members[ti.name] = Member(ti.offset_data, ti.size)
    except tarfile.ReadError as e:
        problems.append(Problem("corrupt", name, None, f"not a readable tar: {e}"))
        return members
    # tarfile stops quietly at a short or garbled header; the archive must end with zeros
    f.seek(end)
    tail = f.read(2 * BLOCK)
    if len(tail) < 2 * BLOCK and end + len(tail) >= size:
        problems.append(Problem(
            "truncated", name, None,
            f"ends at byte {size} without the end-of-archive blocks after byte {end}",
        ))  # fmt: skip
    elif tail.strip(b"\0"):
        problems.append(Problem(
            "corrupt", name, None,
            f"unreadable tar header at byte {end}; members after it cannot be listed",
        ))  # fmt: skip
    return members


def _sha256_at(f: Any, offset: int, size: int) -> tuple[str, int]:
    h = hashlib.sha256()
    f.seek(offset)
    left = size
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest(), size - left


def _read_member(f: Any, m: Member) -> bytes:
    f.seek(m.offset_data)
    return f.read(m.size)


def _check_row(f: Any, name: str, row: dict[str, Any], members: dict[str, Member],
               rep: VerifyReport) -> set[str]:  # fmt: skip
    """Problems of one accepted row; returns the extra members its `{key}.json` declares."""
    key = row["clip_id"]
    declared: set[str] = set()
    mp4 = members.get(f"{key}.mp4")
    for ext in EXTS:
        if f"{key}.{ext}" not in members:
            rep.problems.append(Problem("missing", name, key, f"no member {key}.{ext} in shard"))
    if mp4 is None:
        return declared
    if mp4.offset_data != row["tar_offset"]:
        rep.problems.append(Problem(
            "corrupt", name, key,
            f"mp4 data at byte {mp4.offset_data}, manifest says tar_offset {row['tar_offset']}",
        ))  # fmt: skip
    if mp4.size != row["size_bytes"]:
        rep.problems.append(Problem(
            "corrupt", name, key, f"mp4 is {mp4.size} bytes, manifest says {row['size_bytes']}"
        ))  # fmt: skip
    if row["tar_offset"] is None or row["size_bytes"] is None:
        return declared
    digest, got = _sha256_at(f, row["tar_offset"], row["size_bytes"])
    rep.bytes_hashed += got
    if got < row["size_bytes"]:
        rep.problems.append(Problem(
            "truncated", name, key,
            f"only {got} of {row['size_bytes']} bytes at offset {row['tar_offset']}",
        ))  # fmt: skip
    elif digest != row["sha256"]:
        rep.problems.append(Problem(
            "corrupt", name, key, f"sha256 {digest[:16]}… != manifest {str(row['sha256'])[:16]}…"
        ))  # fmt: skip
    js = members.get(f"{key}.json")
    if js is not None:
        try:
            meta = json.loads(_read_member(f, js))
            bad = [k for k in ("clip_id", "tar_offset", "sha256") if meta.get(k) != row[k]]
            declared = set(meta.get("extras") or ())
        except ValueError:
            bad = ["not JSON"]
        if bad:
            rep.problems.append(Problem(
                "corrupt", name, key, f"{key}.json disagrees with the manifest on {bad}"
            ))  # fmt: skip
        for ext in sorted(declared):
            if f"{key}.{ext}" not in members:
                rep.problems.append(Problem("missing", name, key, f"no member {key}.{ext}"))
    txt = members.get(f"{key}.txt")
    if txt is not None:
        caption = _read_member(f, txt).decode("utf-8", "replace")
        if caption != (row["caption"] or ""):
            rep.problems.append(Problem("corrupt", name, key, f"{key}.txt differs from caption"))
    return declared


def verify(out: str | Path | Out) -> VerifyReport:
    o = out if isinstance(out, Out) else open_out(out)
    con = connect(o)
    rep = VerifyReport(o.url)
    cols = ["clip_id", "shard", "tar_offset", "size_bytes", "sha256", "caption"]
    cur = con.execute(f"SELECT {', '.join(cols)} FROM clips WHERE status = 'accepted'")
    rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    for (cid, n) in con.execute(
        "SELECT clip_id, count(*) FROM clips GROUP BY clip_id HAVING count(*) > 1"
    ).fetchall():  # fmt: skip
        rep.problems.append(Problem("manifest", None, cid, f"{n} rows share this clip_id"))
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r["shard"]:
            rep.problems.append(Problem("manifest", None, r["clip_id"], "accepted without shard"))
            continue
        by_shard.setdefault(r["shard"], []).append(r)
    present = {posixpath.basename(p): p for p in o.shards()}
    for name in sorted(set(by_shard) - set(present)):
        for r in by_shard[name]:
            rep.problems.append(Problem("missing", name, r["clip_id"], "shard file not found"))
    for name, path in present.items():
        rep.shards += 1
        with o.fs.open(path, "rb") as f:
            size = o.fs.size(path)
            members = scan_shard(f, size, name, rep.problems)
            rep.members += len(members)
            declared = {}
            for r in by_shard.get(name, []):
                rep.rows_checked += 1
                declared[r["clip_id"]] = _check_row(f, name, r, members, rep)
            for mname in sorted(members):
                key, _, ext = mname.partition(".")
                if key not in declared:
                    rep.problems.append(Problem(
                        "extra", name, key, f"member {mname} has no accepted row in this shard"
                    ))  # fmt: skip
                elif ext not in EXTS and ext not in declared[key]:
                    rep.problems.append(Problem(
                        "extra", name, key, f"member {mname} is not listed in {key}.json"
                    ))  # fmt: skip
    return rep


def format_report(rep: VerifyReport) -> str:
    head = (
        f"verify {rep.out}: {rep.shards} shards, {rep.members} members, "
        f"{rep.rows_checked} accepted rows, {rep.bytes_hashed} bytes hashed"
    )
    if rep.ok:
        return head + "\nOK: every accepted row matches its shard bytes; no extra members"
    lines = [head]
    counts = ", ".join(f"{len(rep.by_kind(k))} {k}" for k in KINDS if rep.by_kind(k))
    lines.append(f"FAILED: {len(rep.problems)} problems ({counts})")
    lines += [f"  {p}" for p in rep.problems]
    return "\n".join(lines)
