"""`hdvg manifest query|show|verify|takedown` and `hdvg report` (registered by hdvg.cli)."""

from __future__ import annotations

import argparse
import json
import sys


def _fail(cmd: str, e: Exception) -> int:
    print(f"hdvg {cmd}: {e}", file=sys.stderr)
    return 2


def _query(args: argparse.Namespace) -> int:
    import duckdb

    from .query import FORMATS, query
    from .read import ManifestError

    try:
        cols, rows = query(args.out, args.sql)
    except (ManifestError, duckdb.Error) as e:
        return _fail("manifest query", e)
    text = FORMATS[args.format](cols, rows)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .read import ManifestError
    from .show import ClipNotFound, format_text, lineage

    try:
        lin = lineage(args.out, args.clip_id)
    except (ManifestError, ClipNotFound) as e:
        return _fail("manifest show", e)
    if args.format == "json":
        print(json.dumps(lin, indent=1, default=str, ensure_ascii=False))
    else:
        print(format_text(lin))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .read import ManifestError
    from .verify import format_report, verify

    try:
        rep = verify(args.out)
    except ManifestError as e:
        return _fail("manifest verify", e)
    print(format_report(rep), file=sys.stdout)
    return 0 if rep.ok else 1


def _takedown(args: argparse.Namespace) -> int:
    from .read import ManifestError
    from .takedown import TakedownError, takedown

    try:
        res = takedown(args.out, sources=args.source or [], clips=args.clip or [],
                       reason=args.reason)  # fmt: skip
    except (ManifestError, TakedownError) as e:
        return _fail("manifest takedown", e)
    print(res.summary())
    return 0


def _report(args: argparse.Namespace) -> int:
    from .read import ManifestError
    from .report import write_report

    try:
        html, card = write_report(args.out, thumbnails=args.thumbnails)
    except ManifestError as e:
        return _fail("report", e)
    print(f"report: {html}\ndataset card: {card}")
    return 0


def register(sub) -> None:
    m = sub.add_parser("manifest", help="audit an output: SQL, lineage, verify, takedown")
    msub = m.add_subparsers(dest="manifest_command", required=True)

    q = msub.add_parser("query", help="DuckDB SQL over the tables clips and sources")
    q.add_argument("out", help="output folder (OUT): a path or an fsspec URL")
    q.add_argument("sql", help='e.g. "select reason, count(*) from clips group by all"')
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.set_defaults(func=_query)

    s = msub.add_parser("show", help="full lineage of one clip")
    s.add_argument("out", help="output folder (OUT): a path or an fsspec URL")
    s.add_argument("clip_id", help="a clips row's clip_id (= its WebDataset key)")
    s.add_argument("--format", choices=["text", "json"], default="text")
    s.set_defaults(func=_show)

    v = msub.add_parser("verify", help="shards vs manifest: offsets, sizes, sha256, members")
    v.add_argument("out", help="output folder (OUT): a path or an fsspec URL")
    v.set_defaults(func=_verify)

    t = msub.add_parser("takedown", help="remove clips from the shards; rows marked removed")
    t.add_argument("out", help="output folder (OUT), local")
    g = t.add_argument_group("what to remove (one or more)")
    g.add_argument("--source", action="append", metavar="URL", help="every clip of this source")
    g.add_argument("--clip", action="append", metavar="ID", help="one clip (repeatable)")
    t.add_argument("--reason", default="takedown request", help="recorded in removed_reason")
    t.set_defaults(func=_takedown_checked(t))

    r = sub.add_parser("report", help="OUT/report.html (plots, thumbnails) + OUT/DATASET_CARD.md")
    r.add_argument("out", help="output folder (OUT): a path or an fsspec URL")
    r.add_argument("--thumbnails", type=int, default=24, help="how many sample thumbnails")
    r.set_defaults(func=_report)


def _takedown_checked(parser: argparse.ArgumentParser):
    def run(args: argparse.Namespace) -> int:
        if not args.source and not args.clip:
            parser.error("give --source URL or --clip ID")
        return _takedown(args)

    return run
