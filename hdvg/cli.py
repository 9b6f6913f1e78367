"""`hdvg` command line. Subcommands of other parts register themselves (`register(sub)`)."""

from __future__ import annotations

import argparse
import importlib
import sys


def _curate(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_pipeline, parse_overrides
    from .runner import OutputError, StallError, curate, ray_running, stop_ray
    from .sources import SourceListError

    ray_was_up = ray_running()
    try:
        cfg = load_pipeline(args.pipeline, parse_overrides(args.set or []))
        if args.executor:
            cfg.ray.executor = args.executor
        curate(
            cfg, args.input, args.output, ray_address=args.ray_address, limit=args.limit,
            retry_failed=args.retry_failed, quiet=args.quiet,
        )  # fmt: skip
    except (ConfigError, SourceListError, OutputError, StallError) as e:
        print(f"hdvg curate: {e}", file=sys.stderr)
        return 2
    finally:
        if not ray_was_up and ray_running():
            # the Ray this command started (or joined) ends with the job, not in Ray's exit
            # hook, which first sleeps 0.5 s to let log lines drain (ours are printed)
            stop_ray()
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 or -1 would silently mean "all" or "none")."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="hdvg",
        description="Curate web video into a captioned HD text-video dataset (WebDataset shards"
        " + Parquet manifests), audit it, and train / sample a swap-attention text-to-video"
        " model on it.",
        epilog="`hdvg COMMAND --help` for each command; the README has worked examples.",
    )
    p.add_argument("--version", action="version", version=f"hdvg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curate", help="run a curation pipeline: sources -> shards + manifests")
    c.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/smoke.yaml")
    c.add_argument("--input", required=True, help="directory of videos or a source list")
    c.add_argument("--output", required=True, help="output folder (OUT)")
    c.add_argument("--ray-address", default=None, help="Ray cluster address (default: local)")
    c.add_argument(
        "--limit", type=positive_int, default=None, help="process only the first N sources"
    )
    c.add_argument("--retry-failed", action="store_true", help="re-attempt failed sources")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    c.add_argument(
        "--executor", choices=["ray", "serial"], default=None,
        help="ray (default: Ray Data stages) or serial (one process, no Ray: for debugging)",
    )  # fmt: skip
    c.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing on stderr; the summary is still in OUT/run.json",
    )
    c.set_defaults(func=_curate)
    for mod in ("hdvg.manifest.cli", "hdvg.models", "hdvg.t2v.cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and (e.name == mod or mod.startswith(e.name + ".")):
                continue  # that part is not installed / not built yet
            raise
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
