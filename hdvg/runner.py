"""The curation runner: the only module that imports Ray.

Sources flow as one row each ({order, source_id, result: pickled SourceResult}): the
source stage (download → cut, CPU tasks with retries) then, when the recipe has model
stages, an actor pool (`map_batches`, models loaded once per actor, GPUs when present),
fed by a CPU frame pool (`map`) that decodes and pre-processes the clips' frames so a GPU
actor's process only runs models.
The driver streams results in input order into the `DatasetWriter`, which commits shards
and manifest parts together; the driver never holds more than one shard's worth of clips.
"""

from __future__ import annotations

import _thread
import json
import os
import pickle
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import PIPELINE_VERSION, __version__
from .config import PipelineConfig
from .manifest.writer import DatasetWriter, Ledger
from .pipeline import (
    ModelStageActor,
    SourceProcessor,
    build_stages,
    frame_pool_row,
    manifest_meta,
    model_stages,
    result_of,
    yield_cpu,
)
from .records import SourceRecord, SourceResult, SourceTask
from .sources import read_sources


class OutputError(RuntimeError):
    """OUT cannot be created or written."""


class StallError(RuntimeError):
    """No source finished for `ray.stall_timeout_s`."""


# --- work done on Ray workers (module-level so Ray pickles by reference) -------------

_PROCESSORS: dict[str, SourceProcessor] = {}


def _source_fn(row: dict[str, Any], cfg: PipelineConfig, out: str) -> dict[str, Any]:
    task: SourceTask = pickle.loads(row["task"])
    # Ray retries a task whose worker died (SIGKILL, OOM, node loss) without limit; a
    # source that kills its worker every time would loop forever, so attempts are counted
    # on disk (they survive the dead worker) and the source fails after max_task_retries.
    marker = Path(out) / ".work" / "attempts" / task.source_id
    attempts = _count_attempt(marker)
    if attempts > cfg.ray.max_task_retries + 1:
        rec = SourceRecord(task.source_id, task.url, task.order, input_id=task.input_id,
                           input_caption=task.input_caption)  # fmt: skip
        rec.fail(
            "worker_lost", f"its worker died on {attempts - 1} attempts (ray.max_task_retries)"
        )
        result = SourceResult(rec)
    else:
        key = cfg.hash() + out
        proc = _PROCESSORS.get(key)
        if proc is None:  # stages set up once per worker process, not per source
            proc = _PROCESSORS[key] = SourceProcessor(cfg, out)
            yield_cpu(cfg)  # GPU actors first (models.cpu_nice)
        result = proc(task)
    marker.unlink(missing_ok=True)
    return {"order": row["order"], "source_id": task.source_id, "result": pickle.dumps(result)}


def _count_attempt(marker: Path) -> int:
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        n = int(marker.read_text() or 0) + 1
    except (FileNotFoundError, ValueError):
        n = 1
    marker.write_text(str(n))
    return n


# --- driver ---------------------------------------------------------------------------


@dataclass
class Progress:
    total: int
    quiet: bool = False
    done: int = 0
    video_s: float = 0.0  # footage of the sources done (probed duration)
    clips: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    last_print: float = 0.0
    last_event: float = field(default_factory=time.monotonic)

    def update(self, result: SourceResult) -> None:
        self.done += 1
        self.last_event = time.monotonic()
        if result.source.probe is not None:
            self.video_s += result.source.probe.duration_s
        for c in result.clips:
            self.clips[c.status] += 1
        now = time.monotonic()
        if not self.quiet and (now - self.last_print > 2.0 or self.done == self.total):
            self.last_print = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        el = max(now - self.started, 1e-9)
        left = self.total - self.done
        # the rate so far includes start-up: the estimate only errs long
        eta = f", ~{el / self.done * left:.0f}s left" if left and self.done else ""
        return (
            f"[hdvg] sources {self.done}/{self.total} | {self.video_s / 60:.1f} min of video, "
            f"{self.video_s / el:.1f}x realtime | clips accepted {self.clips['accepted']} "
            f"rejected {self.clips['rejected']} failed {self.clips['failed']} | "
            f"{el:.0f}s elapsed{eta}"
        )


def _watchdog(progress: Progress, timeout_s: float, stop: threading.Event, flag: list) -> None:
    while not stop.wait(1.0):
        if time.monotonic() - progress.last_event > timeout_s:
            flag.append(True)
            _thread.interrupt_main()  # surfaces as KeyboardInterrupt in the driver loop
            return


def _init_ray(cfg: PipelineConfig, address: str | None):
    import logging

    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        # under `ray job submit` (and KubeRay) RAY_ADDRESS names the cluster to join
        addr = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if addr:
            kwargs["address"] = addr
        else:
            if cfg.ray.num_cpus:
                kwargs["num_cpus"] = cfg.ray.num_cpus
            if cfg.ray.object_store_mb:
                kwargs["object_store_memory"] = cfg.ray.object_store_mb * 1024**2
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def ray_running() -> bool:
    """Whether this process is connected to a Ray (without importing Ray to find out)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def stop_ray() -> None:
    """``ray.shutdown()``, without its one-second wait on the embedded cluster's autoscaler
    monitor. Ray stops its processes one after another, SIGTERM then up to 1 s each; the
    monitor does not exit on SIGTERM once the GCS is gone, so every run paid that second
    before the SIGKILL that ends it anyway (shutdown 1.36 s -> 0.35 s). Only the monitor of a
    head node this process started is killed; a cluster we joined is only disconnected."""
    import ray

    try:  # a private handle: a Ray without it simply shuts down the usual way
        node = ray._private.worker._global_node
        if node is not None and node.is_head():
            for info in node.all_processes.get("monitor", []):
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - shutting down regardless
        pass
    ray.shutdown()


def _ray_results(cfg: PipelineConfig, tasks: list[SourceTask], out: str, address: str | None):
    ray = _init_ray(cfg, address)
    items = [{"order": t.order, "task": pickle.dumps(t)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 100_000)))
    # Ray Data retries tasks and restarts actors lost with their worker by default (and
    # never retries user exceptions: per-source errors are rows already); `_source_fn`
    # bounds the retries per source itself, so no deprecated `ray_remote_args` are needed.
    ds = ds.map(_source_fn, fn_kwargs={"cfg": cfg, "out": out}, num_cpus=cfg.ray.source_cpus)
    if model_stages(cfg):
        gpus = cfg.models.num_gpus if (cfg.models.device != "cpu" and _cluster_has_gpu(ray)) else 0
        pool = cfg.models.frame_pool
        if pool or (pool is None and gpus):
            # frames decoded on CPU workers ahead of the actors: a GPU actor only runs models
            ds = ds.map(frame_pool_row, fn_kwargs={"cfg": cfg}, num_cpus=cfg.models.frame_pool_cpus)
        ds = ds.map_batches(
            ModelStageActor,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.models.batch_size,
            batch_format="pyarrow",  # columns the actor does not read pass through uncopied
            compute=_actor_pool(ray, cfg),
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
        )
    for row in ds.iter_rows():
        yield result_of(row)


def _actor_pool(ray, cfg: PipelineConfig):
    """`models.actors` actors, each running `models.actor_calls` calls at once on threads
    (`ModelStageActor` runs its models one batch at a time itself)."""
    n = cfg.models.actor_calls
    try:
        return ray.data.ActorPoolStrategy(
            size=cfg.models.actors, max_concurrent_calls_per_actor=n,
            enable_true_multi_threading=n > 1,
        )  # fmt: skip
    except TypeError:  # Ray before 2.5x: one call at a time per actor
        return ray.data.ActorPoolStrategy(size=cfg.models.actors)


def _cluster_has_gpu(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _serial_results(cfg: PipelineConfig, tasks: list[SourceTask], out: str):
    proc = SourceProcessor(cfg, out)
    actor = ModelStageActor(cfg) if model_stages(cfg) else None
    for t in tasks:
        r = proc(t)
        if actor:
            actor.process([r])
        yield r


def score_columns(cfg: PipelineConfig) -> list[str]:
    cols: list[str] = []
    for section in ("filters", "clip_stages"):
        for s in build_stages(cfg, section):
            cols += [c for c in s.score_columns if c not in cols]
    return cols


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to output {out}: {e}") from None


def curate(
    cfg: PipelineConfig,
    input_spec: str,
    out: str | Path,
    *,
    ray_address: str | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run a curation job; returns the run summary (also written to OUT/run.json)."""
    out = Path(out).resolve()
    started = time.time()
    tasks = read_sources(input_spec)
    if limit is not None:
        tasks = tasks[:limit]
    _prepare_out(out)
    # worker-death counts of an earlier, killed run do not carry over (see `_source_fn`)
    shutil.rmtree(out / ".work" / "attempts", ignore_errors=True)
    ledger = Ledger(out)
    if retry_failed:
        from .manifest.writer import drop_failed_sources

        drop_failed_sources(out, ledger)
        ledger = Ledger(out)
    todo = [t for t in tasks if t.source_id not in ledger.done_sources]
    skipped = len(tasks) - len(todo)
    if not quiet:
        msg = f"[hdvg] {len(tasks)} sources, {skipped} already done, {len(todo)} to process"
        print(msg, file=sys.stderr, flush=True)
    writer = DatasetWriter(
        out, manifest_meta(cfg), score_columns(cfg), cfg.shards.max_samples,
        cfg.shards.max_bytes, cfg.shards.mtime, ledger,
    )  # fmt: skip
    progress = Progress(len(todo), quiet)
    stop, stalled = threading.Event(), []
    dog = threading.Thread(
        target=_watchdog, args=(progress, cfg.ray.stall_timeout_s, stop, stalled), daemon=True
    )
    dog.start()
    try:
        if not todo:
            results = iter(())
        elif cfg.ray.executor == "serial":
            results = _serial_results(cfg, todo, str(out))
        else:
            results = _ray_results(cfg, todo, str(out), ray_address)
        for result in results:
            writer.add(result)
            progress.update(result)
        writer.close()
    except KeyboardInterrupt:
        if stalled:
            raise StallError(
                f"no source finished for {cfg.ray.stall_timeout_s:.0f}s (ray.stall_timeout_s); "
                "committed work is kept: rerun the same command to resume"
            ) from None
        raise
    finally:
        stop.set()
    summary = summarize(out, cfg, started, input_spec, ray_address)
    (out / "run.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    if not quiet:
        print(format_summary(summary), file=sys.stderr, flush=True)
    return summary


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    from .ffmpeg import ffmpeg_version

    out = {"hdvg": __version__, "python": sys.version.split()[0], "ffmpeg": ffmpeg_version()}
    for pkg in ("ray", "scenedetect-headless", "av", "pyarrow", "torch", "transformers",
                "open-clip-torch"):  # fmt: skip
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def summarize(out: Path, cfg: PipelineConfig, started: float, input_spec: str,
              ray_address: str | None) -> dict[str, Any]:  # fmt: skip
    import pyarrow.parquet as pq

    clips = pq.read_table(out / "manifest" / "clips").to_pylist() if any(
        (out / "manifest" / "clips").glob("*.parquet")) else []  # fmt: skip
    sources = pq.read_table(out / "manifest" / "sources").to_pylist() if any(
        (out / "manifest" / "sources").glob("*.parquet")) else []  # fmt: skip
    timings: Counter = Counter()
    for s in sources:
        timings.update(json.loads(s["timings"] or "{}"))
    shards = sorted(p.name for p in (out / "shards").glob("shard-*.tar"))
    return {
        "pipeline": cfg.name,
        "pipeline_version": PIPELINE_VERSION,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
        "input": str(input_spec),
        "output": str(out),
        "ray_address": ray_address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local",
        "versions": _versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 3),
        "counts": {
            "sources": len(sources),
            "sources_by_status": dict(Counter(s["status"] for s in sources)),
            "sources_failed_by_reason": dict(
                Counter(s["reason"] for s in sources if s["status"] == "failed")
            ),
            "clips": len(clips),
            "clips_by_status": dict(Counter(c["status"] for c in clips)),
            "clips_rejected_by_reason": dict(
                Counter(c["reason"] for c in clips if c["status"] == "rejected")
            ),
            "clips_failed_by_reason": dict(
                Counter(c["reason"] for c in clips if c["status"] == "failed")
            ),
            "shards": len(shards),
            "accepted_hours": round(
                sum(c["duration_s"] or 0 for c in clips if c["status"] == "accepted") / 3600, 4
            ),
        },
        "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
    }


def format_summary(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = [
        f"[hdvg] done in {s['wall_s']:.1f}s -> {s['output']}",
        f"  sources: {c['sources']} {c['sources_by_status']}",
    ]
    if c["sources_failed_by_reason"]:
        lines.append(f"    failed by reason: {c['sources_failed_by_reason']}")
    lines.append(f"  clips: {c['clips']} {c['clips_by_status']}")
    if c["clips_rejected_by_reason"]:
        lines.append(f"    rejected by reason: {c['clips_rejected_by_reason']}")
    if c["clips_failed_by_reason"]:
        lines.append(f"    failed by reason: {c['clips_failed_by_reason']}")
    lines.append(f"  shards: {c['shards']}, accepted hours: {c['accepted_hours']}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items())
    lines.append(f"  stage seconds (summed over workers): {stages}")
    return "\n".join(lines)
