"""Learned watermark detector: a classifier head on CLIP image embeddings (open_clip
backbone), averaged over the clip's frames. The head is a linear layer with one output
(a logit) or two (clean, watermark), or a LAION-format MLP giving a logit; the score is
the watermark probability. Complements the weight-free `static_overlay` detector, which
only sees overlays that stay put while the picture moves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...frames import Frames
from ..base import Check
from .clip_backbone import BackboneConfig
from .clip_filter import HeadFilter


@dataclass
class WatermarkConfig(BackboneConfig):
    head: str = "watermark-clip-vit-l-14.pth"  # absolute, or under $HDVG_WEIGHTS
    max_score: float | None = 0.5  # above: reason watermark


class WatermarkFilter(HeadFilter):
    name = "watermark"
    Config = WatermarkConfig
    score_columns = ("watermark_score",)

    def score_embeddings(self, frames: list[Frames], emb: list[np.ndarray]):
        import torch

        y = self.head_outputs(emb)
        p = torch.softmax(y, -1)[:, 1] if y.shape[1] == 2 else torch.sigmoid(y[:, 0])
        return [{"watermark_score": float(v)} for v in p.numpy()]

    def checks(self) -> list[Check]:
        return [Check("watermark_score", "<=", self.cfg.max_score, "watermark")]
