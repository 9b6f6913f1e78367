"""Text-area score: the share of the picture covered by text-like regions, no weights.

Clips dominated by on-screen text (slides, title cards, subtitled lectures) are dropped
from HD-VG-style cleaned sets. Text lines are found the classic morphological way: top-hat
and black-hat pick out strokes thinner than a character, components of character height
and stroke-like fill are kept, a horizontal closing joins them into lines, and a line
counts when it is wide, short and densely filled. Four 30 px lines over a moving fractal
score about 0.05, moving content without text below 0.02. The score is the largest covered share over a few
frames (text on one card is enough). Weight-free and rough: it tells "heavy text" from
"little text", not where every word is.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...frames import Frames
from ..base import Check
from .base import WeightFreeFrameFilter


@dataclass
class TextAreaConfig:
    max_text_area: float | None = 0.03  # above: reason text (share of the picture)
    width: int = 640
    frames: int = 3  # frames examined: the middle one and evenly spread others
    actor: bool = False  # run on the model actor pool (shares the model stages' decode)


def text_area(gray: np.ndarray, contrast: int = 60) -> float:
    """Share of a gray frame covered by text lines (boxes of the lines found)."""
    h, w = gray.shape
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (max(9, h // 24),) * 2)
    # strokes thinner than the kernel, brighter or darker than their surroundings
    hat = np.maximum(cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, k),
                     cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, k))  # fmt: skip
    strokes = (hat > contrast).astype(np.uint8)
    n, _, st, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
    chars = np.zeros_like(strokes)
    for x, y, cw, ch, a in st[1:]:
        # letters and words: character height, thin strokes (not a filled blob, not a line)
        if 5 <= ch <= 0.1 * h and a >= 10 and 0.08 <= a / (cw * ch) <= 0.75:
            chars[y : y + ch, x : x + cw] = 1
    lines = cv2.morphologyEx(chars, cv2.MORPH_CLOSE,
                             cv2.getStructuringElement(cv2.MORPH_RECT, (max(7, w // 60), 1)))  # fmt: skip
    n, _, st, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
    covered = sum(int(lw) * int(lh) for _, _, lw, lh, a in st[1:]
                  if lh <= 0.12 * h and lw >= 3 * lh and a >= 0.5 * lw * lh)  # fmt: skip
    return min(1.0, covered / (h * w))


class TextAreaFilter(WeightFreeFrameFilter):
    name = "text_area"
    Config = TextAreaConfig
    score_columns = ("text_area",)

    def score_frames(self, fr: Frames) -> dict[str, float | None]:
        g = fr.gray()
        k = min(self.cfg.frames, len(g))
        picks = {fr.middle} | {int(i) for i in np.linspace(0, len(g) - 1, k)}
        s = self.cfg.width / g.shape[2]
        size = (self.cfg.width, max(2, round(g.shape[1] * s)))
        vals = [
            text_area(cv2.resize(g[i], size, interpolation=cv2.INTER_AREA))
            for i in sorted(picks)[:k]
        ]
        return {"text_area": max(vals)}

    def checks(self) -> list[Check]:
        return [Check("text_area", "<=", self.cfg.max_text_area, "text")]
