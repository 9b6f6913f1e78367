"""The open_clip backbone shared by the CLIP-score, aesthetic and watermark stages: one
load per actor (`hdvg.models.cached`) and one image embedding per clip (`frames.memo`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...config import ModelsConfig
from ...frames import Frames
from ...models import WeightRef, device_for, load_open_clip, resolve_open_clip


@dataclass
class BackboneConfig:
    """Fields every CLIP-based stage config carries (the stage configs repeat them)."""

    model: str = "ViT-L-14"  # open_clip architecture
    pretrained: str | None = "openai"  # open_clip tag, looked up in the HF cache
    path: str | None = None  # open_clip local-dir, or a checkpoint for `model`
    frames: int = 3  # frames embedded per clip (middle included), embeddings averaged
    batch_size: int = 64


class Backbone:
    def __init__(self, stage: str, cfg, models: ModelsConfig):
        self.stage, self.cfg, self.models = stage, cfg, models
        self.model = self.preprocess = self.tokenizer = None
        self.device = "cpu"

    def ref(self) -> WeightRef:
        c = self.cfg
        return resolve_open_clip(self.stage, c.model, c.pretrained, c.path, self.models)

    def load(self) -> None:
        ref = self.ref()
        if not ref.found:
            raise ref.error()
        self.device = device_for(self.models)
        self.model, self.preprocess, self.tokenizer = load_open_clip(
            ref, self.cfg.model, self.cfg.pretrained, self.device, self.models)  # fmt: skip
        self.key = f"clip-img:{ref.resolved or ref.model}:{self.cfg.frames}"
        self.label = ref.label

    @property
    def dim(self) -> int:
        import torch

        with torch.no_grad():
            x = torch.zeros(1, 3, *self._size(), device=self.device, dtype=self._dtype())
            return int(self.model.encode_image(x).shape[-1])

    def _size(self) -> tuple[int, int]:
        s = self.model.visual.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def _dtype(self):
        return next(self.model.parameters()).dtype

    def image_embeddings(self, frames: list[Frames]) -> list[np.ndarray]:
        """L2-normalized mean embedding of each clip's frames, computed once per clip."""
        import torch
        from PIL import Image

        todo = [f for f in frames if self.key not in f.memo]
        if todo:
            imgs, owner = [], []
            for j, fr in enumerate(todo):
                k = min(self.cfg.frames, len(fr.images))
                picks = sorted(
                    {fr.middle} | {int(i) for i in np.linspace(0, len(fr.images) - 1, k)}
                )
                picks = picks[:k] if fr.middle in picks[:k] else [*picks[: k - 1], fr.middle]
                for i in picks:
                    imgs.append(self.preprocess(Image.fromarray(fr.images[i])))
                    owner.append(j)
            embs = []
            with torch.no_grad():
                for a in range(0, len(imgs), self.cfg.batch_size):
                    x = torch.stack(imgs[a : a + self.cfg.batch_size]).to(
                        self.device, self._dtype()
                    )
                    e = self.model.encode_image(x).float()
                    embs.append(torch.nn.functional.normalize(e, dim=-1).cpu())
            e = torch.cat(embs).numpy()
            owner_a = np.array(owner)
            for j, fr in enumerate(todo):
                m = e[owner_a == j].mean(axis=0)
                fr.memo[self.key] = m / max(np.linalg.norm(m), 1e-8)
        return [f.memo[self.key] for f in frames]

    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            t = self.tokenizer(texts).to(self.device)
            e = self.model.encode_text(t).float()
            return torch.nn.functional.normalize(e, dim=-1).cpu().numpy()
