"""Deterministic WebDataset tar shards, written to a temporary name and renamed when complete.

Members are sorted within a sample ({key}.json, {key}.mp4, {key}.txt), samples are added
in key order, and every header has a fixed mtime, uid/gid and mode, so the same clips give
the same bytes. `{key}.json` holds the clip's manifest row, including the byte offset of
the mp4's data in this tar (computed before writing, see `_member_layout`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

BLOCK = 512


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
        self.tmp = self.dir / (self.name + ".tmp")
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

    def add(self, key: str, mp4: bytes, caption: str, row: dict[str, Any]) -> dict[str, Any]:
        """Append one sample; returns the row completed with shard, tar_offset, size_bytes."""
        if "." in key:
            raise ValueError(f"WebDataset keys must not contain dots: {key!r}")
        pos = self._tar.offset
        row = dict(row, shard=self.name, size_bytes=len(mp4))
        # {key}.json precedes {key}.mp4 and must hold the mp4's data offset: iterate to the
        # fixed point (the offset's digit count can change the json's padded size).
        offset = pos + 3 * BLOCK
        for _ in range(5):
            row["tar_offset"] = offset
            blob = json.dumps(row, sort_keys=True, ensure_ascii=False).encode()
            new = pos + BLOCK + _padded(len(blob)) + BLOCK
            if new == offset:
                break
            offset = new
        txt = (caption or "").encode()
        for name, data in ((f"{key}.json", blob), (f"{key}.mp4", mp4), (f"{key}.txt", txt)):
            self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))
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
