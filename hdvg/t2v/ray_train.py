"""``hdvg train CONFIG --shards SPEC --output RUN_DIR --ray-workers N [--ray-address auto|ADDR]``.

The same trainer as under torchrun, launched by Ray Train (``ray.train.torch.TorchTrainer``) on
a Ray cluster, or on a local Ray when no address is given (``RAY_ADDRESS``, as set by ``ray job
submit``, is honoured like everywhere in hdvg). Every Ray Train worker runs
:func:`hdvg.t2v.train.main`, one DDP rank each: Ray Train creates the process group (NCCL with
GPUs, gloo without) and picks each worker's GPU; ``setup_distributed()`` takes both as they are.
The shard stream splits across the workers by rank exactly as across torchrun ranks.

Shared filesystem: RUN_DIR (and local shard, VAE, text-encoder and pretrained paths) must be
the same path on every node -- NFS, a mounted bucket, or one machine. Rank 0 writes
``RUN_DIR/{config.yaml, metrics.jsonl, tb/, checkpoints/, last.ckpt}`` as under torchrun,
and on ``--resume`` every rank reads ``RUN_DIR/last.ckpt``; so a run started under torchrun
resumes under Ray and the other way round. Ray Train's own checkpoints are not used (ours
hold the optimizer, EMA, RNG and data position); its run state goes to ``RUN_DIR/ray/``.
Workers need hdvg installed (the docker image), as the curation workers do.

Failures. Ray Train restarts the worker group after a node preemption (a spot instance
reclaimed: without limit, Ray's default) and, with ``--ray-max-failures N``, after N other
worker failures (a node lost, a process killed); each restart resumes from
``RUN_DIR/last.ckpt`` -- every worker runs with ``--resume``, and the launch itself refuses a
run dir that holds a run unless ``--resume`` was given, so a restart never trains over the
run from step 0. When a node is about to be preempted (Ray's drain notice, with its
deadline), the trainer checkpoints after the step in progress and trains on
(:func:`preemption_notice`), so the restart loses at most that step's work, not everything
since the last ``train.ckpt_every``. A failure a restart would only repeat (a bad config or
shards, a diverged run) is recorded in ``RUN_DIR/ray/abort.json``: restarted workers return
at once and the launch ends with that reason, as a single-process run would. SIGTERM to
the driver stops the workers after their step in progress with a checkpoint, exit 143
(:class:`DriverStop`), as it stops a torchrun rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hdvg.t2v.config import ConfigError, T2VConfig, from_dict

log = logging.getLogger("hdvg.t2v.ray_train")


def _worker_spec(spec: str | list[str], timeout_s: float) -> str | list[str]:
    """A shards spec for the workers, checked here (a wrong one fails in one line, not in
    every worker): its local paths made absolute, since workers may start in another
    directory (URLs unchanged)."""
    from hdvg.t2v.data import expand_shards

    specs = [spec] if isinstance(spec, str) else list(spec)
    specs = [s if "://" in s else os.path.abspath(s) for s in specs]
    expand_shards(specs, timeout_s)
    return specs[0] if len(specs) == 1 else specs


def preemption_notice() -> Any:
    """This worker's node-preemption notice (Ray Train's ``PreemptionInfo``: the nodes and
    ranks to go, and the deadline), or None. Read from the worker's own train context, where
    Ray Train's preemption watcher puts it: a plain attribute read, cheap enough to poll every
    step. The public ``ray.train.get_preemption_info()`` returns the same but is a collective
    through Ray (~3.5 ms a call with 2 workers on a 2-core machine), and the trainer already
    agrees across ranks on its own (:class:`hdvg.t2v.train.Preemption`)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError, RuntimeError):  # another Ray: no notice, periodic ckpts
        return None


# a worker's failure that a restart would only repeat (bad config or shards, a diverged
# run) is recorded here under RUN_DIR: the restarted workers return at once and the launch
# reports it, instead of --ray-max-failures restarts (or, with -1, endless ones) of the same
ABORT_FILE = "ray/abort.json"


def _final_kind(error: BaseException) -> str | None:
    """'input' (exit 2), 'diverged' (exit 1), or None: a failure a restart may mend."""
    from hdvg.t2v.data import NoClipsError
    from hdvg.t2v.train import DivergedError

    if isinstance(error, DivergedError):
        return "diverged"
    if isinstance(error, ConfigError | NoClipsError | FileNotFoundError | PermissionError):
        return "input"
    return None


def _reason(error: BaseException) -> str:
    from hdvg.t2v.data import NoClipsError

    return str(NoClipsError(str(error))) if isinstance(error, NoClipsError) else str(error)


# the driver's SIGTERM handler creates it; each rank looks for it at most once a second and
# the ranks agree (their all-reduced vote) to stop after one same step, with a checkpoint
STOP_FILE = "ray/stop"


def stop_request(run_dir: Path, every_s: float = 1.0) -> Callable[[], bool]:
    """For :class:`hdvg.t2v.train.Preemption`: whether the driver asked the run to stop (a
    stat of RUN_DIR/ray/stop on the shared filesystem, at most once every `every_s`)."""
    path, last = run_dir / STOP_FILE, [-math.inf]

    def asked() -> bool:
        now = time.monotonic()
        if now - last[0] < every_s:
            return False
        last[0] = now
        return path.exists()

    return asked


class DriverStop:
    """SIGTERM to the driver (a scheduler, `ray job stop`, `kill`): the workers stop after
    their step in progress with a checkpoint, as a SIGTERM to a torchrun rank does, and the
    launch ends with exit 143; a second SIGTERM ends the driver at once. Ray delivers SIGINT
    to a worker as a task cancellation, so Ctrl-C keeps its default (the workers end with no
    checkpoint beyond the last one). Only in the main thread, where signals can be caught."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STOP_FILE
        self.asked = False
        self._old: Any = None

    def __enter__(self) -> DriverStop:
        self.path.unlink(missing_ok=True)  # an earlier launch's
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:  # again: now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.asked = True
        log.warning("SIGTERM: the workers stop after their step in progress, with a checkpoint "
                    "(a second SIGTERM ends the driver at once)")  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: one DDP rank of :func:`hdvg.t2v.train.main`. Always with
    `resume`: a restarted worker group goes on from RUN_DIR/last.ckpt (the launch checked
    that a run without --resume starts in a run dir without one)."""
    import torch

    from hdvg.t2v.train import Preemption, main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if torch.cuda.is_available():  # the GPU Ray Train assigned to this worker
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    abort = Path(config["output"]) / ABORT_FILE
    if abort.exists():  # an earlier attempt of this launch failed in a way no restart mends
        log.warning("not restarting: %s", json.loads(abort.read_text())["message"])
        return  # every rank alike (RUN_DIR is shared): the launch reports the failure
    cfg = from_dict(T2VConfig, config["cfg"])
    try:
        rc = main(cfg, config["shards"], config["output"], config["steps"], resume=True,
                  preemption_notice=preemption_notice,
                  stop_request=stop_request(Path(config["output"])))  # fmt: skip
    except Exception as e:
        kind = _final_kind(e)
        if kind is not None:
            tmp = abort.with_name(f".{abort.name}.{os.getpid()}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"kind": kind, "message": _reason(e)}))
            os.replace(tmp, abort)
        raise
    if rc not in (0, Preemption.EXIT_CODE):  # 143: stopped as the driver asked, checkpointed
        raise RuntimeError(f"training exited with status {rc}")


def launch(
    cfg: T2VConfig,
    shards: str | list[str],
    output: str | Path,
    steps: int | None = None,
    resume: bool = False,
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    max_failures: int = 0,
) -> int:
    """Run :func:`train_loop` on ``workers`` Ray Train workers; 0 when training finished.

    Defaults: one worker per GPU of the cluster (one worker without GPUs), one GPU per worker
    when the cluster has GPUs, and ``1 + data.num_workers`` CPUs per worker (the rank and its
    DataLoader processes). ``max_failures``: worker-group failures other than preemptions to
    restart from (-1: without limit); preemptions restart without limit.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from hdvg.t2v.train import check_fresh_run, check_validation

    shards = _worker_spec(shards, cfg.data.read_timeout_s)
    check_validation(cfg)
    if cfg.data.val_shards:
        cfg.data.val_shards = _worker_spec(cfg.data.val_shards, cfg.data.read_timeout_s)
    run_dir = Path(output).absolute()
    check_fresh_run(run_dir, resume)  # the workers always resume (restarts go on from there)
    if max_failures < -1:
        raise ConfigError(f"--ray-max-failures {max_failures}: give N >= 0, or -1 for no limit")
    if not ray.is_initialized():
        # address None: RAY_ADDRESS if set (ray job submit, KubeRay), else a local Ray. Its
        # dashboard stays on: it serves the state API Ray Train's placement-group cleaner polls
        ray.init(address=address, logging_level=logging.WARNING)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpus else 0.0
    if gpus_per_worker > 0 and not cluster_gpus:
        raise ConfigError("--ray-gpus-per-worker > 0 but the Ray cluster has no GPUs")
    if workers is None:
        workers = max(1, int(cluster_gpus // gpus_per_worker)) if gpus_per_worker else 1
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 + cfg.data.num_workers
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    log.info(
        "Ray Train: %d workers, %s each, run dir %s (shared by every node)",
        workers,
        resources,
        run_dir,
    )
    from hdvg.t2v.train import absolute_weight_paths

    absolute_weight_paths(cfg)  # from the driver's directory: workers run in others
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "shards": shards,
            "output": str(run_dir),
            "steps": steps,
        },
        torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        # a restart (or the user's rerun with --resume) goes on from RUN_DIR/last.ckpt
        run_config=RunConfig(
            name="ray",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    abort = run_dir / ABORT_FILE
    abort.unlink(missing_ok=True)  # a rerun after the cause was mended
    try:
        with DriverStop(run_dir) as stop:
            trainer.fit()
    except TrainingFailedError as e:
        bad = _recorded_failure(abort) or _known_failure(e)
        if bad is not None:  # as in a single-process run: one line, exit 2 (1: diverged)
            raise bad from None
        log.error("Ray Train run failed: %s", e)
        return 1
    bad = _recorded_failure(abort)  # the restarted workers returned at once
    if bad is not None:
        raise bad
    if stop.asked:
        from hdvg.t2v.train import Preemption

        log.warning("stopped by SIGTERM; %s: --resume goes on from there", run_dir / "last.ckpt")
        return Preemption.EXIT_CODE
    return 0


def _recorded_failure(abort: Path) -> Exception | None:
    from hdvg.t2v.train import DivergedError

    if not abort.exists():
        return None
    rec = json.loads(abort.read_text())
    return (DivergedError if rec["kind"] == "diverged" else ConfigError)(rec["message"])


def _known_failure(error: Exception) -> Exception | None:
    """A worker's ConfigError (a bad config, a checkpoint that does not load), NoClipsError
    (shards with nothing to train on) or DivergedError (non-finite gradients, step after step)
    behind Ray Train's failure, if that is what ended it."""
    from hdvg.t2v.data import NoClipsError
    from hdvg.t2v.train import DivergedError

    for failure in getattr(error, "worker_failures", {}).values():
        while failure is not None:
            if isinstance(failure, NoClipsError):
                return NoClipsError(str(failure))  # Ray's wrapper: its reason alone
            if isinstance(failure, ConfigError | DivergedError):
                return failure
            failure = failure.__cause__
    return None
