"""Base of the filters scored from the shared CLIP image embedding."""

from __future__ import annotations

from ...frames import Frames
from ...models import WeightRef
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
