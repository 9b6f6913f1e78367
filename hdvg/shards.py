"""Deterministic WebDataset tar shards, written to a temporary name and renamed when complete.

Members are sorted within a sample ({key}.json, {key}.mp4, {key}.txt, and the extras a
stage added, such as {key}.latents.npy), samples are added in key order, and every header
has a fixed mtime, uid/gid and mode, so the same clips give the same bytes. `{key}.json`
holds the clip's manifest row, including the byte offset of the mp4's data in this tar
(computed before writing, see `ShardWriter.add`).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

BLOCK = 512
CORE = ("json", "mp4", "txt")  # every sample's members
EXTRA_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*(\.[a-z0-9_-]+)*")  # e.g. "latents.npy"


def staging_path(path: Path, tag: str = "tmp") -> Path:
    """Where `path` is written before its rename: `.{name}.tmp` beside it (`.{name}.{tag}.tmp`
    for another `tag`, such as a takedown's rewrite).

    Hidden (a leading dot), so whoever reads the folder while a run is writing, or after one
    was killed, sees only complete files: pyarrow and Ray read a directory of parts skipping
    dot files, and shard globs never match it. Ending in `.tmp`, so a rerun deletes it.
    """
    suffix = f".{tag}.tmp" if tag != "tmp" else ".tmp"
    return path.with_name(f".{path.name}{suffix}")


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class ShardWriter:
    def __init__(self, shard_dir: str | Path, index: int, mtime: int = 0):
        self.dir = Path(shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.name = shard_name(index)
        self.final = self.dir / self.name
        self.tmp = staging_path(self.final)
        self.mtime = mtime
        self._f = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.bytes = 0

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = size, self.mtime, 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def add(
        self,
        key: str,
        mp4: bytes,
        caption: str,
        row: dict[str, Any],
        extras: dict[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Append one sample; returns the row completed with shard, tar_offset, size_bytes.

        ``extras`` (name -> bytes) become more members ``{key}.{name}``, listed in the row's
        ``extras`` so that ``hdvg manifest verify`` knows them.
        """
        if "." in key:
            raise ValueError(f"WebDataset keys must not contain dots: {key!r}")
        extras = extras or {}
        for name in extras:
            if name in CORE or not EXTRA_NAME.fullmatch(name):
                raise ValueError(f"bad extra member name {name!r} for {key}")
        pos = self._tar.offset
        row = dict(row, shard=self.name, size_bytes=len(mp4))
        row.pop("extras", None)
        if extras:
            row["extras"] = sorted(extras)
        txt = (caption or "").encode()
        members = dict(extras, mp4=mp4, txt=txt, json=b"")
        names = sorted(members)  # members sorted within the sample
        # {key}.json must hold the mp4's data offset, which depends on the json's own padded
        # size when the json comes first: iterate to the fixed point (digit counts can move it)
        offset = pos + 3 * BLOCK
        for _ in range(5):
            row["tar_offset"] = offset
            members["json"] = json.dumps(row, sort_keys=True, ensure_ascii=False).encode()
            new = pos
            for name in names:
                new += BLOCK
                if name == "mp4":
                    break
                new += _padded(len(members[name]))
            if new == offset:
                break
            offset = new
        for name in names:
            data = members[name]
            self._tar.addfile(self._info(f"{key}.{name}", len(data)), io.BytesIO(data))
        self.samples += 1
        self.bytes = self._tar.offset
        return row

    def close(self) -> None:
        """Finish the tar under its temporary name (fsynced); `commit()` makes it visible."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def commit(self) -> Path:
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        try:
            self._tar.close()
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
