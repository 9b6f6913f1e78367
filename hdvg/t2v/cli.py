"""``hdvg train`` and ``hdvg sample``: argparse wiring. ``hdvg/cli.py`` calls :func:`register`;
``python -m hdvg.t2v.cli train|sample ...`` works on its own (and under torchrun); ``train`` with
``--ray-workers`` / ``--ray-address`` launches Ray Train (:mod:`hdvg.t2v.ray_train`)."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from hdvg.cli import positive_int


def _train(args: argparse.Namespace) -> int:
    from hdvg.t2v.config import load_config
    from hdvg.t2v.train import main

    cfg = load_config(args.config)
    if args.val_shards:
        cfg.data.val_shards = args.val_shards[0] if len(args.val_shards) == 1 else args.val_shards
    shards = args.shards[0] if len(args.shards) == 1 else args.shards
    if args.ray_address or args.ray_workers:
        from hdvg.t2v.ray_train import launch

        return launch(
            cfg, shards, args.output, steps=args.steps, resume=args.resume,
            address=args.ray_address, workers=args.ray_workers,
            gpus_per_worker=args.ray_gpus_per_worker, cpus_per_worker=args.ray_cpus_per_worker,
            max_failures=args.ray_max_failures,
        )  # fmt: skip
    return main(cfg, shards, args.output, steps=args.steps, resume=args.resume)


def _sample(args: argparse.Namespace) -> int:
    from hdvg.t2v.sample import main

    return main(
        args.ckpt,
        args.prompt,
        args.out,
        frames=args.frames,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        device=args.device,
        negative_prompt=args.negative_prompt,
        prompts_file=args.prompts,
        batch_size=args.batch_size,
    )


def finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return x


def seed_int(text: str) -> int:
    x = int(text)
    if not -(2**63) <= x < 2**63:  # torch.Generator's range
        raise argparse.ArgumentTypeError(f"{text}: a seed is a 64-bit signed integer")
    return x


def _guard(fn):
    """Bad config / missing input -> a one-line reason and exit status 2 (DESIGN: Exit status)."""

    def run(args: argparse.Namespace) -> int:
        from hdvg.t2v.config import ConfigError
        from hdvg.t2v.data import NoClipsError
        from hdvg.t2v.train import DivergedError

        # progress lines (train: a line per logged step and a summary) on stderr, also when
        # `hdvg train` comes through hdvg/cli.py, which sets up no logging of its own
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

        try:
            return fn(args)
        except (ConfigError, NoClipsError, FileNotFoundError, PermissionError) as e:
            print(f"hdvg {args.command}: {e}", file=sys.stderr)
            return 2
        except DivergedError as e:  # the run failed, not its input: exit 1, still one line
            print(f"hdvg {args.command}: {e}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the swap-attention T2V model on hdvg shards")
    p.add_argument("config", help="t2v YAML config, e.g. pipelines/t2v-base.yaml")
    p.add_argument(
        "--shards",
        required=True,
        nargs="+",
        help="curate OUT dir, shards dir, brace pattern, glob, or several; local or fsspec URL",
    )
    p.add_argument("--output", required=True, help="run dir (checkpoints, metrics, config)")
    p.add_argument(
        "--val-shards", nargs="+", default=None,
        help="held-out shards (as --shards) for train.val_every's val_loss (default: data.val_shards)",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=positive_int, default=None, help="total steps (default: train.steps)"
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.ckpt (or start, if there is none yet); "
                   "without it, a RUN_DIR holding a run is refused")  # fmt: skip
    r = p.add_argument_group(
        "Ray Train (instead of torchrun; RUN_DIR on a filesystem all nodes share)"
    )
    r.add_argument(
        "--ray-address", default=None, help="Ray cluster: auto or ADDR (default: a local Ray)"
    )
    r.add_argument(
        "--ray-workers", type=positive_int, default=None, help="DDP workers (default: one per GPU)"
    )
    r.add_argument(
        "--ray-gpus-per-worker", type=float, default=None, help="default: 1 with GPUs, else 0"
    )
    r.add_argument(
        "--ray-cpus-per-worker", type=float, default=None, help="default: 1 + data.num_workers"
    )
    r.add_argument(
        "--ray-max-failures", type=int, default=0, metavar="N",
        help="restart the workers from RUN_DIR/last.ckpt after up to N failures (-1: no limit); "
        "node preemptions restart without limit (default: 0)",
    )  # fmt: skip
    p.set_defaults(func=_guard(_train), command="train")

    s = subparsers.add_parser("sample", help="sample a video from a t2v checkpoint")
    s.add_argument("--ckpt", required=True, help="checkpoint, e.g. RUN_DIR/last.ckpt")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what the video shows")
    what.add_argument(
        "--prompts", metavar="FILE", help="one prompt a line: a video each, into the folder --out"
    )
    s.add_argument("--out", required=True, help="output .mp4 (with --prompts: a folder)")
    s.add_argument(
        "--batch-size", type=positive_int, default=4,
        help="with --prompts: prompts denoised together (default: 4)",
    )  # fmt: skip
    s.add_argument("--frames", type=positive_int, default=None, help="default: the config's")
    s.add_argument("--steps", type=positive_int, default=None, help="DDIM steps")
    s.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale")  # fmt: skip
    s.add_argument("--seed", type=seed_int, default=0,
                   help="same seed, same video (with --prompts: line i takes seed + i)")  # fmt: skip
    s.add_argument("--negative-prompt", default=None, help="guided away from (default: empty)")
    s.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    s.set_defaults(func=_guard(_sample), command="sample")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="hdvg", description="hdvg t2v: train and sample")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
