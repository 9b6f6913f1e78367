"""Base of the filters scored from the shared CLIP image embedding."""

from __future__ import annotations

import numpy as np

from ...frames import Frames
from ...models import WeightRef, resolve_head
from .base import FrameFilter, ModelMixin
from .clip_backbone import Backbone


class ClipFilter(ModelMixin, FrameFilter):
    uses_model = True

    def backbone(self) -> Backbone:
        if getattr(self, "_backbone", None) is None:
            self._backbone = Backbone(self.name, self.cfg, self.models)
        return self._backbone

    def bind(self, models, check: bool = True) -> None:
        self._backbone = None  # built for the `models:` section now bound
        super().bind(models, check)

    def weights(self) -> list[WeightRef]:
        return [self.backbone().ref()]

    def setup(self) -> None:
        self.resolved()
        self.backbone().load()

    def score_batch(self, frames: list[Frames]) -> list[dict[str, float | None]]:
        return self.score_embeddings(frames, self.backbone().image_embeddings(frames))


class HeadFilter(ClipFilter):
    """A small head on the CLIP image embedding, its weights `cfg.head` under $HDVG_WEIGHTS
    (aesthetic predictor, watermark classifier)."""

    def weights(self) -> list[WeightRef]:
        return [*super().weights(), resolve_head(self.name, self.cfg.head)]

    def setup(self) -> None:
        super().setup()
        ref = resolve_head(self.name, self.cfg.head)
        from .heads import load_head  # torch: imported where a model loads, not by workers

        self.head = load_head(ref.resolved, self.backbone().dim, f"stage {self.name}")

    def head_outputs(self, emb: list[np.ndarray]):
        """(N, outputs) torch tensor of the head on a batch of embeddings."""
        import torch

        with torch.no_grad():
            return self.head(torch.from_numpy(np.stack(emb)).float())
