"""Typed pipeline config: one dataclass per section, loaded from one YAML recipe.

Unknown keys and wrongly typed values are errors that name the key and the file, so a
typo never silently falls back to a default. Filter and clip-stage sections are checked
against the stage registry (`hdvg.stages.REGISTRY`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad pipeline config: unknown key, wrong type or invalid value."""


@dataclass
class RayConfig:
    address: str | None = None  # None: embedded local Ray; "auto" or "ray://host:10001"
    num_cpus: int | None = None  # embedded Ray only; None = all cores
    object_store_mb: int | None = None
    preserve_order: bool = True  # deterministic shard order (same input → same bytes)
    max_task_retries: int = 3  # a source whose worker died is retried this often, then fails
    stall_timeout_s: float = 900.0  # watchdog: fail loudly when no source finishes for this long
    source_cpus: float = 1.0  # CPUs reserved per source task (download → cut)
    executor: str = "ray"  # "ray" | "serial" (debugging, no Ray)

    def validate(self) -> None:
        if self.executor not in ("ray", "serial"):
            raise ConfigError(f"ray.executor must be 'ray' or 'serial', got {self.executor!r}")


@dataclass
class DownloadConfig:
    allowed_schemes: list[str] = field(default_factory=lambda: ["file", "http", "https"])
    allow_private_hosts: bool = False  # loopback / RFC1918 / link-local / metadata addresses
    allowed_hosts: list[str] = field(default_factory=list)  # empty: any public host
    max_bytes: int = 8 * 1024**3
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retries: int = 3  # on timeouts and 5xx only
    backoff_s: float = 1.0
    max_redirects: int = 5
    user_agent: str = "hdvg/0.1 (+https://github.com/hdvg/hdvg)"
    keep: bool = False  # keep downloaded sources under OUT/.work/downloads
    per_host_concurrency: int = 4  # downloads in flight per host, across all Ray workers
    rate_limit_per_s: float | None = None  # global requests/s across all workers
    per_host_rate_per_s: float | None = None  # requests/s per host across all workers
    total_timeout_s: float = 3600.0  # one download, start to end (a slow drip is a timeout)
    ytdlp: dict[str, Any] = field(default_factory=dict)  # hdvg.ytdlp.YtdlpConfig keys


@dataclass
class ProbeConfig:
    timeout_s: float = 60.0
    max_pixels: int = 8192 * 8192  # a larger header is hostile or broken: reason bad_header
    max_duration_s: float = 24 * 3600.0


@dataclass
class ScenesConfig:
    detector: str = "adaptive"  # adaptive | content | histogram | none
    adaptive: dict[str, Any] = field(default_factory=dict)  # AdaptiveDetector kwargs
    content: dict[str, Any] = field(default_factory=dict)  # ContentDetector kwargs
    histogram: dict[str, Any] = field(default_factory=dict)  # HistogramDetector kwargs
    min_scene_frames: int = 8  # detector's own min_scene_len: merges flashes, not our clip rule
    max_clip_s: float = 60.0  # a longer scene is split into equal pieces no longer than this
    frame_width: int = 256  # frames are downscaled to this width for detection
    gray_width: int = 480  # luma thumbnails for pre-cut frame filters (filters.overlay)
    gray_per_minute: int = 12  # at most this many thumbnails per minute of a shot (≥ 8 per shot)
    timeout_s: float = 3600.0
    stall_s: float = 60.0
    decode_threads: int = 1
    fast_decode: bool = True  # skip H.264 deblocking for the detection pass (thumbnails only)

    def validate(self) -> None:
        if self.detector not in ("adaptive", "content", "histogram", "none"):
            raise ConfigError(
                f"scenes.detector must be adaptive|content|histogram|none, got {self.detector!r}"
            )
        if self.max_clip_s <= 0:
            raise ConfigError("scenes.max_clip_s must be > 0")


@dataclass
class CutConfig:
    mode: str = "auto"  # auto: stream copy when a keyframe is close, else re-encode | reencode
    keyframe_tolerance_s: float = 0.2  # how far after a scene start a keyframe may lie for copy
    codec: str = "libx264"
    crf: int = 20
    preset: str = "veryfast"
    fps: float | None = None  # reencode mode: normalize frame rate
    short_side: int | None = None  # reencode mode: normalize size (short side, even)
    threads: int = 1
    keep_audio: bool = False  # clips carry the source audio of their span (AAC when re-encoded)
    timeout_s: float = 300.0

    def validate(self) -> None:
        if self.mode not in ("auto", "reencode"):
            raise ConfigError(f"cut.mode must be 'auto' or 'reencode', got {self.mode!r}")


@dataclass
class ModelsConfig:
    device: str = "auto"  # auto | cpu | cuda
    num_gpus: float = 1.0  # per actor, when CUDA is available
    actors: int = 1  # actor pool size per model stage group
    batch_size: int = 8  # sources per actor call (clips are re-batched per model)
    # decode frames + CPU pre-processing in a CPU task stage ahead of the actors, so the
    # actors' processes only run models; null (auto): when the actors get GPUs
    frame_pool: bool | None = None
    frame_pool_cpus: float = 1.0  # per frame-pool task
    # calls Ray runs at once on each model actor: one batch's unpickling and pickling beside
    # another's models (the models themselves run one batch at a time). 1 measured best on an
    # H100 (BLIP-2 OPT-2.7B: the second call mostly waits for the lock; RESULTS.md)
    actor_calls: int = 1
    # niceness of the CPU workers (source stage, frame pool) when the recipe has model stages:
    # a GPU actor's process launches thousands of small kernels per generate call and must
    # not queue behind decoders for a core. Ray starts every worker, actors included, at 15
    # (RAY_worker_niceness), so 19 puts the actors first; 0: leave priorities alone
    cpu_nice: int = 19
    # physical cores (with their SMT siblings) per GPU of a node that its CPU workers keep off
    # when the recipe has model stages on GPUs: niceness shares a core, it does not free one,
    # and a decoder on the other hardware thread of the actor's core slows it at any priority
    # (pipeline.keep_cores); never more than half a worker's cores; 0: workers use every core
    actor_cores: int = 1
    allow_download: bool = False  # fetch weights from a hub at run time
    cache_dir: str | None = None  # HF cache; default: $HF_HOME

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"models.device must be auto, cpu or cuda, got {self.device!r}")
        if self.actor_calls < 1:
            raise ConfigError(f"models.actor_calls must be >= 1, got {self.actor_calls}")
        if self.actor_cores < 0:
            raise ConfigError(f"models.actor_cores must be >= 0, got {self.actor_cores}")
        if not 0 <= self.cpu_nice <= 19:
            raise ConfigError(f"models.cpu_nice must be within 0..19, got {self.cpu_nice}")


@dataclass
class ShardsConfig:
    max_samples: int = 1000
    max_bytes: int = 1024**3
    mtime: int = 0  # fixed tar mtime: same input → same bytes


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    description: str = ""
    ray: RayConfig = field(default_factory=RayConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    cut: CutConfig = field(default_factory=CutConfig)
    # ordered {stage name: params}; "meta" stages run before the cut, "clip" stages after
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    clip_stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """What produced the data: everything but where and how it ran."""
        d = self.to_dict()
        d.pop("ray", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(
            _check_type(v, a, f"{where}[{i}]")
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and bad types are errors."""
    if data is None:
        data = {}
    at = f"{where}: " if where else "top level: "  # "" = the top of a pipeline config
    if not isinstance(data, dict):
        raise ConfigError(f"{at}expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{at}unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"pipeline config not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return from_dict(raw or {}, str(path), overrides)


def from_dict(
    raw: dict[str, Any], where: str = "config", overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    raw = _merge(raw, overrides or {})
    cfg = build(PipelineConfig, raw, "")
    try:
        validate_stages(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def validate_stages(cfg: PipelineConfig) -> None:
    from .stages import REGISTRY

    for section in ("filters", "clip_stages"):
        for name, params in getattr(cfg, section).items():
            if name not in REGISTRY:
                raise ConfigError(
                    f"{section}.{name}: unknown stage; known: {', '.join(sorted(REGISTRY))}"
                )
            stage_cls = REGISTRY[name]
            want = "meta" if section == "filters" else "clip"
            if stage_cls.needs != want:
                raise ConfigError(
                    f"{section}.{name}: this stage works on {stage_cls.needs!r} "
                    f"and belongs under {'filters' if stage_cls.needs == 'meta' else 'clip_stages'}"
                )
            # validates the params now, at load time, not on a worker hours later
            build(stage_cls.Config, params, f"{section}.{name}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set a.b=3 --set c=[1,2]` → {"a": {"b": 3}, "c": [1, 2]} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    return out
