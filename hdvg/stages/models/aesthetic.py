"""Aesthetic score: the LAION aesthetic predictor (an MLP on CLIP ViT-L/14 image
embeddings, github.com/christophschuhmann/improved-aesthetic-predictor), averaged over
the clip's frames. Scores are on LAION's 1-10 scale; LAION-Aesthetics used ≥ 4.5-5."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...frames import Frames
from ..base import Check
from .clip_backbone import BackboneConfig
from .clip_filter import HeadFilter


@dataclass
class AestheticConfig(BackboneConfig):
    head: str = "sac+logos+ava1-l14-linearMSE.pth"  # absolute, or under $HDVG_WEIGHTS
    min_score: float | None = 4.5  # below: reason low_aesthetic


class AestheticFilter(HeadFilter):
    name = "aesthetic"
    Config = AestheticConfig
    score_columns = ("aesthetic_score",)

    def score_embeddings(self, frames: list[Frames], emb: list[np.ndarray]):
        y = self.head_outputs(emb)[:, 0].numpy()
        return [{"aesthetic_score": float(v)} for v in y]

    def checks(self) -> list[Check]:
        return [Check("aesthetic_score", ">=", self.cfg.min_score, "low_aesthetic")]
