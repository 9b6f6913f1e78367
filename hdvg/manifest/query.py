"""`hdvg manifest query OUT "SQL"`: DuckDB SQL over the `clips` and `sources` views.

Read-only: one query (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) per
call. COPY, EXPORT, ATTACH, INSTALL, SET and the rest are refused before anything runs, so an
audit can neither write files nor change the session it reads through; results leave by
`--format csv|json` on standard output. Reading other files beside the manifest stays
allowed (join a takedown list with `read_csv('list.csv')`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .read import ManifestError, Out, connect

MAX_CELL = 80  # table format only: csv and json print values in full


class NotAQuery(ManifestError):
    """SQL that is not one read-only statement."""


def _read_only(con, sql: str):
    import duckdb

    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise NotAQuery(f"one SQL statement per call, got {len(statements)}")
    st = top = statements[0]  # st: the statement an EXPLAIN chain comes down to
    text = st.query
    while st.type == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs what it explains
        words = [pos for pos, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]
        rest = text[words[1] :] if len(words) > 1 else ""
        if rest.startswith("("):  # EXPLAIN (ANALYZE, FORMAT json) ...
            close = next((p for p in words if p > words[1] and text[p] == ")"), len(text) - 1)
            rest = text[close + 1 :]
        elif rest[:7].upper() in ("ANALYZE", "ANALYSE"):
            rest = rest[7:]
        inner = con.extract_statements(rest) if rest.strip() else []
        if len(inner) != 1:
            raise NotAQuery("EXPLAIN needs one statement to explain")
        text, st = rest, inner[0]
    if st.type == duckdb.StatementType.MULTI:  # PIVOT that first creates types for its columns
        raise NotAQuery("read-only: name a PIVOT's columns (PIVOT ... ON c IN (...))")
    if st.type != duckdb.StatementType.SELECT:
        raise NotAQuery(
            f"read-only: SELECT, WITH, FROM, DESCRIBE, SUMMARIZE or EXPLAIN, not {st.type.name}"
        )
    return top


def query(out: str | Path | Out, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(out)
    cur = con.execute(_read_only(con, sql))
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
