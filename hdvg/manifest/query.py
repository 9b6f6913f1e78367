"""`hdvg manifest query OUT "SQL"`: DuckDB SQL over the `clips` and `sources` views."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .read import Out, connect

MAX_CELL = 80  # table format only: csv and json print values in full


def query(out: str | Path | Out, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(out)
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description] if cur.description else []
    return cols, cur.fetchall()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = (
        v
        if isinstance(v, str)
        else json.dumps(v, default=str)
        if isinstance(v, list | dict)
        else str(v)
    )
    s = s.replace("\n", " ")
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 1] + "…"


def format_table(cols: list[str], rows: list[tuple]) -> str:
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()  # noqa: E731
    out = [line(cols), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def format_csv(cols: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(
            ["" if v is None else json.dumps(v) if isinstance(v, list | dict) else v for v in r]
        )
    return buf.getvalue()


def format_json(cols: list[str], rows: list[tuple]) -> str:
    return json.dumps(
        [dict(zip(cols, r, strict=True)) for r in rows], indent=1, default=str, ensure_ascii=False
    )


FORMATS = {"table": format_table, "csv": format_csv, "json": format_json}
