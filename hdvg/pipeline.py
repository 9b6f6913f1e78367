"""One source, end to end, without Ray: download → probe → scenes → pre-cut filters →
cut → post-cut CPU stages. The runner maps this over sources; model stages run after it
on actor pools through the same `apply_stages`.

Every failure becomes a row with a reason; only programmer errors raise.
"""

from __future__ import annotations

import bisect
import io
import os
import pickle
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import PIPELINE_VERSION
from .config import PipelineConfig
from .cut import CutPlan, cut_clip, expected_frames, plan_cut, remux_clips
from .download import DownloadError, fetch_task
from .ffmpeg import FFmpegError
from .frames import decode_frames, drop_frames, spec_for
from .probe import ProbeError, probe
from .records import Clip, Probe, SourceRecord, SourceResult, SourceTask, clip_key
from .scenes import SceneResult, detect_scenes
from .stages import Stage, StageContext, build_stage


def build_stages(cfg: PipelineConfig, section: str) -> list[Stage]:
    stages = [build_stage(name, params) for name, params in getattr(cfg, section).items()]
    for s in stages:
        if hasattr(s, "bind"):  # model stages: weights per `models:`, missing ones fail here
            s.bind(cfg.models)
    return stages


@contextmanager
def timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


class SourceProcessor:
    """Holds the config and the CPU stages (set up once per worker)."""

    def __init__(self, cfg: PipelineConfig, out_dir: str):
        self.cfg = cfg
        self.work = Path(out_dir) / ".work"
        self.meta_stages = build_stages(cfg, "filters")
        self.clip_stages = [s for s in build_stages(cfg, "clip_stages") if not s.uses_model]
        self.wants_gray = any(getattr(s, "wants_gray", False) for s in self.meta_stages)
        for s in self.meta_stages + self.clip_stages:
            s.setup()

    def __call__(self, task: SourceTask) -> SourceResult:
        cfg = self.cfg
        rec = SourceRecord(
            task.source_id, task.url, task.order, input_id=task.input_id,
            input_caption=task.input_caption,
        )  # fmt: skip
        result = SourceResult(rec)
        tm = rec.timings
        fetched = None
        try:
            with timed(tm, "download"):
                dest = self.work / "downloads" / f"{task.source_id}.bin"
                # yt-dlp sources may fetch only a section: the task comes back re-timed
                fetched, task = fetch_task(task, dest, cfg.download)
            rec.size_bytes, rec.sha256 = fetched.size_bytes, fetched.sha256
            with timed(tm, "probe"):
                rec.probe = probe(fetched.path, cfg.probe)
            with timed(tm, "scenes"):
                scenes = detect_scenes(
                    str(fetched.path), rec.probe, cfg.scenes, task.given_scenes,
                    task.start_s, task.end_s, gray=self.wants_gray,
                )  # fmt: skip
            rec.n_frames, rec.n_scenes = scenes.n_frames, len(scenes.spans)
            if scenes.n_frames < max(1, cfg.scenes.min_scene_frames):
                # a 1-frame "video" is a still image: no clip can be formed from it
                rec.fail("no_scenes", f"decoded {scenes.n_frames} frame(s)")
                return result
            decoded_s = scenes.pts[-1] if scenes.pts else 0.0
            declared = rec.probe.duration_s
            if declared > 2.0 and decoded_s < 0.8 * declared - 0.5:
                # the container promises more than the stream holds: a cut-off download
                rec.fail("truncated", f"decoded {decoded_s:.1f}s of a declared {declared:.1f}s")
                return result
            result.clips, plans = self._candidates(task, rec, scenes)
            ctx = [StageContext(rec.probe)] * len(result.clips)
            with timed(tm, "filter"):
                for stage in self.meta_stages:
                    stage.process_batch(result.clips, ctx)
            with timed(tm, "cut"):
                self._cut_all(fetched.path, result.clips, plans, scenes, rec.probe)
            apply_stages(self.clip_stages, [result])
        except DownloadError as e:
            rec.fail(e.reason, str(e))
        except ProbeError as e:
            rec.fail(e.reason, str(e))
        except FFmpegError as e:
            rec.fail(e.reason, str(e))
        finally:
            if fetched is not None and fetched.temporary and not cfg.download.keep:
                fetched.path.unlink(missing_ok=True)
            for c in result.clips:
                c.samples = []
        rec.n_clips = len(result.clips)
        rec.n_accepted = sum(c.alive for c in result.clips)
        return result

    def _candidates(
        self, task: SourceTask, rec: SourceRecord, scenes: SceneResult
    ) -> tuple[list[Clip], list[CutPlan]]:
        p = rec.probe
        clips, plans = [], []
        frames = [s.frame_index for s in scenes.samples]  # sorted by frame
        for i, sp in enumerate(scenes.spans):
            plan = plan_cut(sp, scenes, self.cfg.cut, p)
            clip = Clip(
                clip_id=clip_key(task.source_id, i), source_id=task.source_id,
                source_url=task.url, clip_index=i, start_s=0.0, end_s=0.0, start_frame=0,
                end_frame=0, duration_s=0.0, width=p.width, height=p.height,
                fps=scenes.fps or p.fps,
            )  # fmt: skip
            self._apply_plan(clip, plan)
            if sp.given is not None:
                clip.source_clip_id, clip.source_caption = sp.given.clip_id, sp.given.caption
            else:  # the input list's caption column
                clip.source_caption = task.input_caption
            a = bisect.bisect_left(frames, plan.start_frame)
            b = bisect.bisect_left(frames, plan.end_frame)
            clip.samples = scenes.samples[a:b]
            clips.append(clip)
            plans.append(plan)
        return clips, plans

    def _apply_plan(self, clip: Clip, plan: CutPlan) -> None:
        """The clip's span, method and (until the cut is probed) expected size and rate."""
        clip.start_s, clip.end_s = plan.start_s, plan.end_s
        clip.start_frame, clip.end_frame = plan.start_frame, plan.end_frame
        clip.duration_s, clip.cut_method = plan.end_s - plan.start_s, plan.method
        s = self.cfg.cut.short_side
        if plan.method == "reencode" and s:
            w, h = clip.width, clip.height
            clip.width, clip.height = (
                (round(w * s / h / 2) * 2, s) if w >= h else (s, round(h * s / w / 2) * 2)
            )
        if self.cfg.cut.fps:
            clip.fps = self.cfg.cut.fps

    def _cut_all(self, src: Path, clips: list[Clip], plans: list[CutPlan],
                 scenes: SceneResult, src_probe: Probe | None = None) -> None:  # fmt: skip
        """Cut the live clips: all stream copies of the source in one remux pass, then the
        re-encodes one by one. A copy whose packets are not exactly its frames is re-planned
        as a re-encode of its scene."""
        live = [(c, p) for c, p in zip(clips, plans, strict=True) if c.alive]
        copies = [(c, p) for c, p in live if p.method == "copy"]
        tmp = str(self.work / "tmp")
        datas = remux_clips(str(src), [p for _, p in copies], scenes, self.cfg.cut, tmp)
        encodes = [(c, p) for c, p in live if p.method != "copy"]
        for (clip, plan), data in zip(copies, datas, strict=True):
            if data is not None:
                self._cut(src, clip, plan, scenes, data)
            else:
                plan = plan_cut(plan.span, scenes, self.cfg.cut, src_probe, copy=False)
                self._apply_plan(clip, plan)
                encodes.append((clip, plan))
        for clip, plan in sorted(encodes, key=lambda cp: cp[0].clip_index):
            self._cut(src, clip, plan, scenes)

    def _cut(self, src: Path, clip: Clip, plan: CutPlan, scenes: SceneResult,
             data: bytes | None = None) -> None:  # fmt: skip
        if data is None:
            try:
                data = cut_clip(str(src), plan, scenes, self.cfg.cut, str(self.work / "tmp"))
            except FFmpegError as e:
                clip.fail("timeout" if e.reason == "timeout" else "cut_error", str(e))
                return
        try:
            info = probe_clip(data)
        except Exception as e:  # noqa: BLE001 - an unreadable clip is this clip's failure
            clip.fail("cut_error", f"clip does not decode: {e}")
            return
        want = expected_frames(plan, self.cfg.cut)
        if info["frames"] != want:  # the cut must hold exactly the span's frames
            clip.fail("cut_error", f"the cut holds {info['frames']} frames, the scene {want}")
            return
        clip.data = data
        clip.size_bytes = len(data)
        clip.codec, clip.width, clip.height = info["codec"], info["width"], info["height"]
        clip.fps, clip.duration_s = info["fps"], info["duration_s"]


def apply_stages(stages: list[Stage], results: list[SourceResult]) -> None:
    """Post-cut stages on the accepted clips of one or more sources (rejected clips are never
    cut). All live clips of the batch go through each stage together, so a model stage sees
    full batches; each source's time is attributed by its share of the clips."""
    for stage in stages:
        # a clip with content: its mp4 bytes, or (from the frame pool) its prepared frames
        live = [(r, c) for r in results for c in r.clips
                if c.alive and (c.data is not None or c.frames is not None)]  # fmt: skip
        if not live:
            return
        t0 = time.perf_counter()
        stage.process_batch([c for _, c in live], [StageContext(r.source.probe) for r, _ in live])
        dt = time.perf_counter() - t0
        share = Counter(id(r) for r, _ in live)
        for r in results:
            if share[id(r)]:
                spent = dt * share[id(r)] / len(live)
                r.source.timings[stage.name] = r.source.timings.get(stage.name, 0.0) + spent


def prepare_frames(stages: list[Stage], results: list[SourceResult], threads: int = 1) -> None:
    """The CPU side of the model stages, run by the frame pool ahead of the model actors:
    each live clip's frames decoded once (`hdvg.frames`, only those the stages read) and
    each stage's CPU pre-processing (`prepare`, e.g. the caption processor's pixel
    tensors), left on `clip.frames` for the actor; when every frame reader says it reads only
    that (`pool_ready`), the decoded images are dropped here rather than carried. A clip
    that does not decode fails here with `decode_error`. Timed per source as `frames`."""
    spec = spec_for(stages)
    if spec is None:
        return
    # every frame reader reads only what its `prepare` left: the frames need not travel
    ready = all(s.pool_ready for s in stages if s.frame_use)
    for r in results:
        live = [c for c in r.clips if c.alive and c.data is not None and c.frames is None]
        if not live:
            continue
        with timed(r.source.timings, "frames"):
            for c in live:
                try:
                    c.frames = decode_frames(c.data, spec, threads)
                except Exception as e:  # noqa: BLE001 - one bad clip is that clip's row
                    c.fail("decode_error", f"frames: {e}")
            for s in stages:
                if hasattr(s, "prepare"):
                    s.prepare([c for c in live if c.alive])
            if ready:  # only the prepared inputs travel on (0.15 MB a clip, not 1.3 MB)
                for c in live:
                    if c.frames is not None:
                        c.frames = c.frames.prepared_only()


_POOL_STAGES: dict[str, list] = {}


def frame_pool_row(row: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """The frame pool: decode and pre-process on a CPU worker what the model actors read.

    When every model stage reads only what it prepared here (`pool_ready`), the clips' mp4
    bytes leave the result for a column of their own, `clip_data`, which the actors pass on
    untouched (Arrow batches: no copy) and `result_of` puts back: a model actor's process
    then handles ~0.15 MB a clip instead of ~2.3 MB (mp4 bytes of 2 s of 720p, frames,
    float32 pixels), whose unpickling and pickling took 0.5-1 s per 128 clips on a 2-core
    VM: as long as BLIP-2's generate call for them on an H100."""
    stages = _POOL_STAGES.get(cfg.hash())
    if stages is None:  # built once per worker; the models themselves are not loaded here
        stages = _POOL_STAGES[cfg.hash()] = model_stages(cfg)
        yield_cpu(cfg)
    result = pickle.loads(row["result"])
    prepare_frames(stages, [result], max(1, int(cfg.models.frame_pool_cpus)))
    data = b""
    if all(s.pool_ready for s in stages):  # no model stage reads the mp4 bytes
        data = pickle.dumps([c.data for c in result.clips], protocol=5)
        for c in result.clips:
            c.data = None
    return {**row, "result": pickle.dumps(result, protocol=5), "clip_data": data}


def yield_cpu(cfg: PipelineConfig) -> None:
    """Make this CPU worker (source stage, frame pool) give way to the GPU model actors, when
    the recipe has model stages: lower its priority to `models.cpu_nice`, and on a node with
    GPUs keep it off `models.actor_cores` physical cores per GPU (:func:`keep_cores`).

    On an H100, BLIP-2's generate for 128 clips took 0.62 s alone but 0.96 s beside 14 busy
    frame-pool processes on 16 cores: the GPU actor's thread launches thousands of small
    kernels per call and waited for a core. Niced decoders still use every idle cycle, but
    the actor (left at Ray's worker niceness, 15) wins a core when it wants one -- 0.80 s --
    though niceness only weighs the shares of a core (nice 15 against 19 is ~70 / 30), and a
    decoder on the other hardware thread of the actor's core slows it whatever its priority.
    Once per worker process (the ffmpeg children it starts inherit both)."""
    want = cfg.models.cpu_nice
    if not model_stages(cfg):
        return
    if want:
        try:
            os.nice(max(0, want - os.nice(0)))
        except OSError:  # not permitted here: run at the priority we have
            pass
    keep_cores(cfg)


_KEPT: set[int] | None = None  # the CPUs this process keeps off, once set


SYSFS = "/sys/devices/system/cpu"  # where the CPUs' topology is read


def keep_cores(cfg: PipelineConfig) -> set[int]:
    """Keep this process off `models.actor_cores` physical cores (with their SMT siblings) per
    GPU of the node, the highest-numbered ones, when the model actors run on GPUs: the
    actors' launch threads then always find a free core. Never more than half the cores this
    process may use. Returns the CPUs kept off (empty: nothing changed); once per process."""
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    _KEPT = set()
    if cfg.models.actor_cores <= 0 or cfg.models.device == "cpu":
        return _KEPT
    gpus = node_gpus()
    if gpus <= 0:
        return _KEPT
    allowed = os.sched_getaffinity(0)
    cores = physical_cores(allowed, SYSFS)
    n = min(cfg.models.actor_cores * gpus, len(cores) // 2)
    kept = set().union(*cores[len(cores) - n :]) if n else set()
    if kept:
        try:
            os.sched_setaffinity(0, allowed - kept)
            _KEPT = kept
        except OSError:
            pass
    return _KEPT


def node_gpus() -> int:
    """NVIDIA GPUs on this node, from the driver's device files: a CPU worker has no CUDA
    context to ask, and Ray hides every GPU from it (CUDA_VISIBLE_DEVICES is empty)."""
    try:
        procfs = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        procfs = 0
    try:
        devs = sum(1 for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit())
    except OSError:
        devs = 0
    return max(procfs, devs)


def physical_cores(cpus: set[int], sysfs: str = SYSFS) -> list[frozenset]:
    """`cpus` grouped by physical core (hardware threads of one core together), in CPU order;
    a CPU whose topology cannot be read is a core of its own."""
    cores: dict[frozenset, None] = {}
    for c in sorted(cpus):
        try:
            text = Path(f"{sysfs}/cpu{c}/topology/thread_siblings_list").read_text()
            siblings = _cpu_list(text) & cpus
        except (OSError, ValueError):
            siblings = set()
        cores.setdefault(frozenset(siblings or {c}), None)
    return list(cores)


def _cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8} (the kernel's CPU list format)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def result_of(row: dict[str, Any]) -> SourceResult:
    """A source's result from its row after the model actors, its clips' bytes put back."""
    result = pickle.loads(row["result"])
    if row.get("clip_data"):
        for c, data in zip(result.clips, pickle.loads(row["clip_data"]), strict=True):
            if c.status != "failed":  # a failed clip drops its bytes (`Clip.fail`)
                c.data = data
    return result


def model_stages(cfg: PipelineConfig) -> list:
    return [s for s in build_stages(cfg, "clip_stages") if s.uses_model]


class ModelStageActor:
    """Runs the recipe's model stages; weights load once, in `__init__` (Ray actor).
    `stages`: already set-up stages (the benchmark attaches a model built in place).

    Ray may call it from several threads at once (`models.actor_calls`): unpickling a
    batch's rows and pickling its results run beside another batch's models, the models
    one batch at a time (a lock), so the device never waits for that CPU work. `timings`:
    seconds per step, summed over calls (the benchmark's breakdown)."""

    def __init__(self, cfg: PipelineConfig, stages: list | None = None):
        if _KEPT:  # a CPU worker's process Ray reused for this actor: the kept cores are its own
            os.sched_setaffinity(0, os.sched_getaffinity(0) | _KEPT)
        self.stages = model_stages(cfg) if stages is None else stages
        if stages is None:
            for s in self.stages:
                s.setup()
        spec = spec_for(self.stages)  # the frames this recipe reads, decoded once per clip
        for s in self.stages:
            s.frame_spec = spec
        self._device = threading.Lock()
        self._stats = threading.Lock()
        self.timings: Counter = Counter()

    def process(self, results: list[SourceResult]) -> None:
        apply_stages(self.stages, results)
        drop_frames(results)  # frames from the pool end here: they never reach the driver

    def __call__(self, batch):
        """A batch of rows: a dict of columns, or an Arrow table (Ray's `pyarrow` batches,
        whose other columns, e.g. `clip_data`, go back as they came, without a copy)."""
        t0 = time.perf_counter()
        arrow = hasattr(batch, "column_names")
        col = batch.column("result").to_pylist() if arrow else batch["result"]
        results = [pickle.loads(b) for b in col]
        t1 = time.perf_counter()
        with self._device:
            t2 = time.perf_counter()
            self.process(results)
            t3 = time.perf_counter()
        out = [pickle.dumps(r, protocol=5) for r in results]
        if arrow:
            import pyarrow as pa

            i = batch.schema.get_field_index("result")
            batch = batch.set_column(i, "result", pa.array(out, batch.schema.field(i).type))
        else:
            batch["result"] = out
        t4 = time.perf_counter()
        with self._stats:
            self.timings.update(calls=1, unpickle_s=t1 - t0, lock_wait_s=t2 - t1,
                                process_s=t3 - t2, pickle_s=t4 - t3)  # fmt: skip
        return batch


def probe_clip(data: bytes) -> dict:
    """Codec, size, frame count, fps and duration of a written clip (decoding headers only)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        if not c.streams.video:
            raise ValueError("no video stream (ffmpeg encoded no frame)")
        vs = c.streams.video[0]
        pts = sorted(p.pts for p in c.demux(vs) if p.pts is not None)
        tb = float(vs.time_base)
        n = len(pts)
        if n == 0:
            raise ValueError("no frames")
        if n > 1:
            step = (pts[-1] - pts[0]) / (n - 1)
            duration = (pts[-1] - pts[0] + step) * tb
            fps = 1.0 / (step * tb) if step > 0 else float(vs.average_rate or 0)
        else:
            fps = float(vs.average_rate or 0) or 25.0
            duration = 1.0 / fps
        w, h = vs.codec_context.width, vs.codec_context.height
        return {"codec": vs.codec_context.codec.canonical_name, "width": w, "height": h, "fps": fps,
                "duration_s": duration, "frames": n}  # fmt: skip


def manifest_meta(cfg: PipelineConfig) -> dict[str, str]:
    return {"pipeline_version": PIPELINE_VERSION, "config_hash": cfg.hash()}
