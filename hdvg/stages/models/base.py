"""Shared shell of the model stages: weights bound to `models:` config, frames from the
per-clip cache, whole-batch scoring.

Reason codes these stages emit (to be listed in `hdvg.records.REASONS`):
  watermark       static overlay (logo, channel mark, burned-in text) or learned watermark
  low_motion      optical flow below clip_stages.motion.min_motion (a static clip)
  high_motion     optical flow above clip_stages.motion.max_motion (shake, flashes)
  text            on-screen text covers more than clip_stages.text_area.max_text_area
  low_aesthetic   aesthetic score below clip_stages.aesthetic.min_score
  low_clip_score  text–clip similarity below clip_stages.clip_score.min_score
  decode_error    (existing code) the cut clip's frames could not be decoded
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...config import ModelsConfig
from ...frames import Frames, FrameSpec, get_frames
from ...models import WeightRef
from ...records import Clip
from ..base import Filter, Stage, StageContext


class ModelMixin:
    """For stages with weights. `bind()` is called by `build_stages` with the recipe's
    `models:` section and fails early, on the driver, when weights are missing."""

    name: ClassVar[str]
    models: ModelsConfig = ModelsConfig()

    def weights(self) -> list[WeightRef]:
        return []

    def bind(self, models: ModelsConfig, check: bool = True) -> None:
        self.models = models
        if check:
            for ref in self.weights():
                if not ref.found:
                    raise ref.error()

    def resolved(self) -> list[WeightRef]:
        refs = self.weights()
        for ref in refs:
            if not ref.found:
                raise ref.error()
        return refs

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, "model": [r.label for r in self.weights()] or None}


def frames_of(clips: list[Clip], spec: FrameSpec | None = None) -> list[tuple[Clip, Frames]]:
    """Frames of each clip; a clip whose frames do not decode fails with `decode_error`."""
    out = []
    for c in clips:
        try:
            out.append((c, get_frames(c, spec)))
        except Exception as e:  # noqa: BLE001 - one bad clip is that clip's row
            c.fail("decode_error", f"frames: {e}")
    return out


class FrameFilter(Filter):
    """A filter scored from the clip's cached frames, all clips of a call at once.

    Subclasses implement `score_frames(frames) -> scores` (one clip) or, for batched
    models, `score_batch(list of frames) -> list of scores`.
    """

    needs = "clip"
    frame_use = "spread"

    def score_frames(self, fr: Frames) -> dict[str, float | None]:
        raise NotImplementedError

    def score_batch(self, frames: list[Frames]) -> list[dict[str, float | None]]:
        return [self.score_frames(f) for f in frames]

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        return self.score_batch([get_frames(clip, self.frame_spec)])[0]

    def process_batch(self, clips: list[Clip], ctx: list[StageContext]) -> None:
        pairs = frames_of(clips, self.frame_spec)
        if not pairs:
            return
        for (clip, _), scores in zip(pairs, self.score_batch([f for _, f in pairs]), strict=True):
            self.apply(clip, scores)


class WeightFreeFrameFilter(FrameFilter):
    """A frame filter without weights. It runs on the CPU source workers by default; with
    `actor: true` it joins the model actor pool and shares the model stages' one decode
    of each clip (recipes with model stages should set it)."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.uses_model = bool(getattr(cfg, "actor", False))


__all__ = ["FrameFilter", "ModelMixin", "Stage", "WeightFreeFrameFilter", "frames_of"]
