"""CLIP text–clip similarity (open_clip): cosine between the caption's text embedding and
the clip's mean frame embedding. The text is the caption this run wrote (put the
`caption` stage first) or, failing that, the caption the input came with. A clip without
text gets no score and no decision."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...frames import Frames, get_frames
from ...records import Clip
from ..base import Check, StageContext
from .base import frames_of
from .clip_backbone import BackboneConfig
from .clip_filter import ClipFilter


@dataclass
class ClipScoreConfig(BackboneConfig):
    min_score: float | None = 0.2  # below: reason low_clip_score (cosine; ViT-L/14 scale)
    text: str = "auto"  # auto (caption, else source caption) | caption | source_caption


class ClipScoreFilter(ClipFilter):
    name = "clip_score"
    Config = ClipScoreConfig
    score_columns = ("clip_score",)

    def text_of(self, clip: Clip) -> str | None:
        if self.cfg.text == "caption":
            return clip.caption
        if self.cfg.text == "source_caption":
            return clip.source_caption
        return clip.caption or clip.source_caption

    def process_batch(self, clips: list[Clip], ctx: list[StageContext]) -> None:
        with_text = [c for c in clips if self.text_of(c)]
        for c in clips:
            if not self.text_of(c):
                c.scores["clip_score"] = None  # nothing to compare with: no decision
        pairs = frames_of(with_text, self.frame_spec)
        if not pairs:
            return
        bb = self.backbone()
        img = np.stack(bb.image_embeddings([f for _, f in pairs]))
        txt = bb.text_embeddings([self.text_of(c) for c, _ in pairs])
        for (c, _), s in zip(pairs, (img * txt).sum(axis=1), strict=True):
            self.apply(c, {"clip_score": float(s)})

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        text = self.text_of(clip)
        if not text:
            return {"clip_score": None}
        bb = self.backbone()
        img = bb.image_embeddings([get_frames(clip, self.frame_spec)])[0]
        return {"clip_score": float(img @ bb.text_embeddings([text])[0])}

    def score_embeddings(self, frames: list[Frames], emb):  # unused: needs the text
        raise NotImplementedError

    def checks(self) -> list[Check]:
        return [Check("clip_score", ">=", self.cfg.min_score, "low_clip_score")]
