"""Input lists: a directory of videos, or a .txt/.csv/.jsonl/.parquet list, or HD-VG-130M
metadata JSON. Each entry becomes a `SourceTask` with a stable `source_id`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import SourceTask, source_id_for

VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts", ".m4v", ".mpg", ".mpeg", ".flv"}


class SourceListError(ValueError):
    """The input list itself is unreadable (exit non-zero), as opposed to a bad source (a row)."""


def _task(order: int, row: dict[str, Any]) -> SourceTask:
    url = str(row.get("url") or "").strip()
    if not url:
        raise SourceListError(f"entry {order}: no url")

    def num(key: str) -> float | None:
        v = row.get(key)
        if v is None or v == "" or (isinstance(v, float) and v != v):
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            raise SourceListError(f"entry {order}: {key}={v!r} is not a number") from None

    def text(key: str) -> str | None:
        v = row.get(key)
        if v is None or v != v or (isinstance(v, str) and not v.strip()):  # None, NaN, ""
            return None
        return str(v)

    ident, caption = text("id"), text("caption")
    return SourceTask(
        order=order,
        url=url,
        source_id=source_id_for(url),
        input_id=ident,
        input_caption=caption,
        start_s=num("start"),
        end_s=num("end"),
    )


def read_sources(spec: str | Path) -> list[SourceTask]:
    p = Path(spec)
    if p.is_dir():
        # a dangling link is listed too: it becomes a not_found row, not a silent gap
        files = sorted(f for f in p.rglob("*") if (f.is_file() or f.is_symlink() and not
                       f.exists()) and f.suffix.lower() in VIDEO_EXTS)  # fmt: skip
        return [_task(i, {"url": str(f.resolve())}) for i, f in enumerate(files)]
    if not p.is_file():
        raise SourceListError(f"input not found: {spec}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".txt":
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            rows = [{"url": ln} for ln in lines if ln and not ln.startswith("#")]
        elif suffix == ".csv":
            import pandas as pd

            rows = pd.read_csv(p, dtype=str, keep_default_na=False).to_dict("records")
        elif suffix == ".jsonl":
            rows = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
        elif suffix == ".json":
            from .hdvg_meta import read_hdvg_metadata

            data = json.loads(p.read_text())
            if (
                isinstance(data, list)
                and data
                and not any(isinstance(e, dict) and ("clip" in e or "clips" in e) for e in data)
            ):
                rows = data  # a plain JSON list of {"url": ...} rows, like .jsonl
            else:
                return read_hdvg_metadata(p)
        else:
            raise SourceListError(
                f"unsupported input list {p.name}: use a directory, .txt, .csv, .jsonl, "
                ".parquet or HD-VG-130M metadata .json"
            )
    except SourceListError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of the list is one clear error
        raise SourceListError(f"cannot read input list {p}: {e}") from None
    if rows and "url" not in rows[0]:
        raise SourceListError(f"input list {p} has no 'url' column")
    tasks = [_task(i, r) for i, r in enumerate(rows)]
    seen: set[str] = set()
    unique = []
    for t in tasks:  # the same URL twice would give the same keys twice
        if t.source_id not in seen:
            seen.add(t.source_id)
            unique.append(t)
    for i, t in enumerate(unique):
        t.order = i
    return unique
