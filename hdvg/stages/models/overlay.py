"""Static-overlay detector: logos, channel marks and burned-in text, without weights.

An overlay stays put while the picture under and around it changes. From frames spread
over the clip: edges present in (nearly) every frame are candidates; candidates are
grouped into blobs; a blob counts as an overlay when it is small and the pixels right
around it change over time. Static scenery in a locked-off shot also has persistent
edges, but its neighbourhood is static too, so it scores low; and a clip where almost
nothing moves is reported as static (score 0), because there an overlay cannot be told
from the scene. Black bars (letterbox/pillarbox) are found first: the seam between bar
and picture is a persistent edge that is not an overlay, while a logo inside a bar is.

Score: the moving share of the blob's surroundings (0..1), scaled by how persistent its
edges are. The box is reported in the clip's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...frames import Frames
from ...records import Clip
from ..base import Check, Filter, StageContext
from .base import WeightFreeFrameFilter


@dataclass
class OverlayConfig:
    max_score: float | None = 0.5  # reject when overlay_score exceeds this (reason: watermark)
    width: int = 480  # analysis width (frames are downscaled to it)
    persist: float = 0.85  # an edge must be present in this share of the sampled frames
    change_level: float = 6.0  # temporal std (luma levels) above which a pixel "moves"
    min_moving: float = 0.15  # below this moving share of the picture the clip is static
    max_box_fraction: float = 0.12  # larger persistent regions are scenery, not overlays
    min_box_px: int = 80  # persistent edge pixels a blob needs (at analysis width): a zoom's
    # fixed point or a corner of static scenery leaves a few dozen, a 24 px word hundreds
    black_level: int = 24  # luma at or below this counts as a black bar
    # overlays sit near the picture's edges; the centre holds zoom fixed points and other
    # static detail of real content. Centred stock watermarks are the learned detector's job
    edge_band: float = 0.15
    actor: bool = False  # run on the model actor pool (shares the model stages' decode)


@dataclass
class Overlay:
    score: float
    box: tuple[int, int, int, int] | None  # x, y, w, h in analysis pixels
    moving: float  # moving share of the picture
    static: bool


def content_box(gray: np.ndarray, black_level: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the picture inside black bars. A bar row/column is
    mostly dark in every frame (a logo inside the bar leaves it a bar)."""
    dark = (gray.max(axis=0) <= black_level).astype(np.float32)  # (H, W) dark in all frames
    rows, cols = dark.mean(axis=1) >= 0.7, dark.mean(axis=0) >= 0.7

    def run(mask: np.ndarray) -> tuple[int, int]:
        if mask.all():
            return 0, len(mask)
        a = int(np.argmax(~mask))
        b = len(mask) - int(np.argmax(~mask[::-1]))
        return a, b

    t, b = run(rows)
    left, r = run(cols)
    return t, b, left, r


def detect_static_overlay(gray: np.ndarray, cfg: OverlayConfig) -> Overlay:
    """`gray`: (N, H, W) uint8 frames spread over one clip, at analysis size."""
    n, h, w = gray.shape
    t, b, left, r = content_box(gray, cfg.black_level)
    std = gray.astype(np.float32).std(axis=0)  # (H, W) temporal change
    moving = std > cfg.change_level
    picture = np.zeros((h, w), bool)
    picture[t:b, left:r] = True
    moving_share = float(moving[picture].mean()) if picture.any() else 0.0
    if n < 3 or moving_share < cfg.min_moving:
        return Overlay(0.0, None, moving_share, True)

    k3 = np.ones((3, 3), np.uint8)
    edges = np.stack([cv2.dilate(cv2.Canny(g, 60, 160), k3) > 0 for g in gray])  # (N, H, W)
    persist = edges.mean(axis=0)  # (H, W)
    cand = persist >= cfg.persist
    # the bar/picture seam is persistent by construction: mask a band around it
    seam = np.zeros((h, w), bool)
    pad = 4
    if t > 0 or b < h:
        seam[max(0, t - pad) : t + pad, :] = True
        seam[max(0, b - pad) : b + pad, :] = True
    if left > 0 or r < w:
        seam[:, max(0, left - pad) : left + pad] = True
        seam[:, max(0, r - pad) : r + pad] = True
    seam[:2, :] = seam[-2:, :] = True  # frame border: scaler ringing
    seam[:, :2] = seam[:, -2:] = True
    cand &= ~seam
    if cand.sum() < cfg.min_box_px:
        return Overlay(0.0, None, moving_share, False)

    # glyphs of a word / parts of a logo into one blob
    kx, ky = max(3, w // 40), max(3, h // 60)
    blob = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((ky, kx), np.uint8))
    nlab, lab, stats, _ = cv2.connectedComponentsWithStats(blob, connectivity=8)
    area_pic = max(1, (b - t) * (r - left))
    best = Overlay(0.0, None, moving_share, False)
    for i in range(1, nlab):
        x, y, bw, bh, _ = (int(v) for v in stats[i])
        comp = lab == i
        npx = int((cand & comp).sum())
        if (
            npx < cfg.min_box_px or bw * bh > cfg.max_box_fraction * area_pic or min(bw, bh) < 6
        ):  # thin: a static line
            continue
        bx0, by0 = (x - left) / (r - left), (y - t) / (b - t)
        bx1, by1 = (x + bw - left) / (r - left), (y + bh - t) / (b - t)
        e = cfg.edge_band
        if not (bx0 <= e or by0 <= e or bx1 >= 1 - e or by1 >= 1 - e):
            continue
        m = max(6, min(bh, bw) // 2)  # ring around the box
        x0, y0, x1, y1 = max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m)
        ring = np.zeros((h, w), bool)
        ring[y0:y1, x0:x1] = True
        ring[y : y + bh, x : x + bw] = False
        ring_pic = ring & picture
        # ring pixels in a black bar have no picture under them: they count as moving at
        # the picture's rate, so a logo inside a bar is judged by the picture's motion
        around = (moving[ring_pic].sum() + moving_share * (ring & ~picture).sum()) / ring.sum()
        score = float(around) * float(persist[cand & comp].mean())
        if score > best.score:
            best = Overlay(score, (x, y, bw, bh), moving_share, False)
    return best


def overlay_scores(gray: np.ndarray, clip_width: int, cfg: OverlayConfig) -> dict:
    """Score columns of one clip from (N, H, W) luma frames: downscale to the analysis
    width, detect, report the box in the clip's pixels."""
    if gray.shape[2] > cfg.width:
        size = (cfg.width, max(2, round(gray.shape[1] * cfg.width / gray.shape[2])))
        gray = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in gray])
    ov = detect_static_overlay(gray, cfg)
    out: dict[str, float | None] = {"overlay_score": ov.score, "moving_fraction": ov.moving}
    scale = clip_width / gray.shape[2]
    box = [round(v * scale) for v in ov.box] if ov.box else [None] * 4
    out.update(zip(("overlay_x", "overlay_y", "overlay_w", "overlay_h"), box, strict=True))
    return out


class StaticOverlayFilter(WeightFreeFrameFilter):
    name = "static_overlay"
    Config = OverlayConfig
    score_columns = ("overlay_score", "overlay_x", "overlay_y", "overlay_w", "overlay_h",
                     "moving_fraction")  # fmt: skip

    def score_frames(self, fr: Frames) -> dict[str, float | None]:
        return overlay_scores(fr.gray(), fr.width, self.cfg)

    def checks(self) -> list[Check]:
        return [Check("overlay_score", "<=", self.cfg.max_score, "watermark")]


@dataclass
class ScanOverlayConfig(OverlayConfig):
    max_frames: int = 8  # thumbnails the detector looks at: those nearest the centres of
    # equal spans of the clip, as the post-cut detector samples (not the clip's first frame)


class ScanOverlayFilter(Filter):
    """The same static-overlay detector, before the cut, on the luma thumbnails kept by the
    scene-detection decode (`scenes.gray_width` wide): no second decode of the clip, and a
    watermarked clip is never cut. `static_overlay` (after the cut) reads the clip itself;
    recipes use one or the other."""

    name = "overlay"
    Config = ScanOverlayConfig
    needs = "meta"
    wants_gray = True
    score_columns = StaticOverlayFilter.score_columns

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        have = [s for s in clip.samples if s.gray is not None]
        n = self.cfg.max_frames
        if len(have) > n:
            span = max(1, clip.end_frame - clip.start_frame)
            idx = np.array([s.frame_index for s in have])
            want = clip.start_frame + (np.arange(n) + 0.5) * span / n
            pick = sorted({int(np.abs(idx - t).argmin()) for t in want})
            have = [have[i] for i in pick]
        thumbs = [s.gray for s in have]
        if not thumbs:
            return dict.fromkeys(self.score_columns)
        return overlay_scores(np.stack(thumbs), clip.width, self.cfg)

    def checks(self) -> list[Check]:
        return [Check("overlay_score", "<=", self.cfg.max_score, "watermark")]
