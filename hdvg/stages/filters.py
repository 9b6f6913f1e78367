"""Pre-cut filters: the HD-VG rules that need only the probe and the sampled frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..records import Clip
from .base import Check, Filter, StageContext


@dataclass
class DurationConfig:
    min_s: float | None = 2.0
    max_s: float | None = 60.0


class DurationFilter(Filter):
    name = "duration"
    Config = DurationConfig
    score_columns = ("duration_s",)

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        return {"duration_s": clip.duration_s}

    def checks(self) -> list[Check]:
        return [
            Check("duration_s", ">=", self.cfg.min_s, "too_short"),
            Check("duration_s", "<=", self.cfg.max_s, "too_long"),
        ]


@dataclass
class ResolutionConfig:
    min_short_side: int = 720  # HD-VG-130M: high definition, short side ≥ 720


class ResolutionFilter(Filter):
    name = "resolution"
    Config = ResolutionConfig
    score_columns = ("short_side",)

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        return {"short_side": float(min(clip.width, clip.height))}

    def checks(self) -> list[Check]:
        return [Check("short_side", ">=", self.cfg.min_short_side, "resolution")]


@dataclass
class AspectConfig:
    target: float = 16 / 9
    tolerance: float = 0.03  # relative: |aspect / target - 1| <= tolerance


class AspectFilter(Filter):
    name = "aspect"
    Config = AspectConfig
    score_columns = ("aspect_ratio", "aspect_error")

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        ar = clip.width / clip.height if clip.height else 0.0
        return {"aspect_ratio": ar, "aspect_error": abs(ar / self.cfg.target - 1.0)}

    def checks(self) -> list[Check]:
        return [Check("aspect_error", "<=", self.cfg.tolerance, "aspect")]


@dataclass
class LetterboxConfig:
    max_bar_fraction: float = 0.04  # share of the frame (per axis) allowed to be black bars
    black_level: int = 24  # luma at or below this counts as black (limited range black is 16)


def bar_fractions(
    profiles: list[tuple[np.ndarray, np.ndarray]], black_level: int
) -> tuple[float, float]:
    """Fraction of rows (top+bottom) and columns (left+right) that are black in every frame.

    `profiles` are per-frame (brightest value per row, brightest value per column), kept by
    the scene pass. A bar must be black across all sampled frames: a dark scene is not a
    letterbox.
    """
    if not profiles:
        return 0.0, 0.0
    rows_max = np.stack([p[0] for p in profiles]).max(axis=0)  # (H,)
    cols_max = np.stack([p[1] for p in profiles]).max(axis=0)  # (W,)

    def edge_run(mask: np.ndarray) -> int:
        if mask.all():
            return len(mask)
        return int(np.argmax(~mask)) + int(np.argmax(~mask[::-1]))

    rows = edge_run(rows_max <= black_level) / len(rows_max)
    cols = edge_run(cols_max <= black_level) / len(cols_max)
    return rows, cols


class LetterboxFilter(Filter):
    name = "letterbox"
    Config = LetterboxConfig
    score_columns = ("letterbox_fraction", "pillarbox_fraction", "content_aspect")

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        profiles = [s.image for s in clip.samples if s.image is not None]
        if not profiles:
            return {"letterbox_fraction": None, "pillarbox_fraction": None, "content_aspect": None}
        rows, cols = bar_fractions(profiles, self.cfg.black_level)
        content_h = clip.height * (1 - rows)
        content_w = clip.width * (1 - cols)
        aspect = content_w / content_h if content_h > 0 else None
        return {"letterbox_fraction": rows, "pillarbox_fraction": cols, "content_aspect": aspect}

    def checks(self) -> list[Check]:
        return [
            Check("letterbox_fraction", "<=", self.cfg.max_bar_fraction, "letterbox"),
            Check("pillarbox_fraction", "<=", self.cfg.max_bar_fraction, "letterbox"),
        ]
