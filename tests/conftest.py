"""Shared fixtures: media made with ffmpeg at test time, one real local Ray per session,
and one real curated output that the auditor / t2v / model tests read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from hdvg import media
from hdvg.media import VideoSpec

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


# Without a GPU, Triton's interpreter runs the fused norm kernels on CPU tensors
# (tests/t2v/test_kernels.py); it is chosen when triton is first imported, so here.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the session (2 CPUs), shared by every in-process run."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip
    yield ray
    ray.shutdown()


@dataclass
class Media:
    path: Path
    spec: VideoSpec | None
    expect: str  # "accepted" or the reason the clips (or the source) should carry


# name -> (spec, expected outcome of its full-length clips)
SPECS: dict[str, tuple[VideoSpec, str]] = {
    "hd1080.mp4": (VideoSpec(1920, 1080, 25, (2.4, 3.0, 2.6)), "accepted"),
    "hd720.mp4": (VideoSpec(1280, 720, 30, (2.5, 3.2)), "accepted"),
    "sd480.mp4": (VideoSpec(854, 480, 25, (2.5, 2.5)), "resolution"),
    "tv4x3.mp4": (VideoSpec(960, 720, 25, (2.5, 2.5)), "aspect"),
    "vertical.mp4": (VideoSpec(720, 1280, 25, (2.5, 2.5)), "aspect"),
    "scope239.mp4": (VideoSpec(1720, 720, 25, (2.5, 2.5)), "aspect"),
    "letterboxed.mp4": (VideoSpec(1280, 536, 25, (2.5, 2.5), pad_to=(1280, 720)), "letterbox"),
    # no keyframe at the cut: the second clip must be re-encoded, not copied
    "nokey720.mp4": (VideoSpec(1280, 720, 25, (2.5, 2.5), keyframes_at_cuts=False), "accepted"),
}


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> dict[str, Media]:
    d = tmp_path_factory.mktemp("media")
    out: dict[str, Media] = {}
    for name, (spec, expect) in SPECS.items():
        out[name] = Media(media.make_video(d / name, spec), spec, expect)
    vfr, _cut = media.make_vfr_video(d / "vfr.mp4")
    out["vfr.mp4"] = Media(vfr, None, "accepted")
    late_spec = VideoSpec(1280, 720, 25, (2.5, 2.5))
    out["late.ts"] = Media(media.make_late_start_video(d / "late.ts", late_spec), late_spec,
                           "accepted")  # fmt: skip
    (d / "zero.mp4").write_bytes(b"")
    out["zero.mp4"] = Media(d / "zero.mp4", None, "empty")
    (d / "page.mp4").write_text("<html><body>Error 404</body></html>")
    out["page.mp4"] = Media(d / "page.mp4", None, "not_video")
    good = (d / "hd720.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good[: len(good) // 3])
    out["truncated.mp4"] = Media(d / "truncated.mp4", None, "failed")
    corrupt = bytearray(good)
    for i in range(64, len(corrupt), 97):  # smash the header and every 97th byte
        corrupt[i] ^= 0xFF
    (d / "corrupt.mp4").write_bytes(bytes(corrupt))
    out["corrupt.mp4"] = Media(d / "corrupt.mp4", None, "failed")
    return out


@pytest.fixture(scope="session")
def curated(tmp_path_factory, ray_local, media_dir) -> Path:
    """A real `hdvg curate pipelines/smoke.yaml` output over `media_dir` (run once)."""
    from hdvg.config import load_pipeline
    from hdvg.runner import curate

    root = Path(__file__).resolve().parents[1]
    src = tmp_path_factory.mktemp("sources")
    listing = src / "sources.txt"
    listing.write_text("".join(f"{m.path}\n" for m in media_dir.values()))
    out = tmp_path_factory.mktemp("curated") / "out"
    cfg = load_pipeline(root / "pipelines" / "smoke.yaml")
    curate(cfg, str(listing), out, quiet=True)
    return out
