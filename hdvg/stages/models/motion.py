"""Motion score: dense optical flow (Farnebäck, OpenCV) between neighbouring frames.

HD-VG-style cleaning drops static clips (slideshows, still images with a zoom-free
"video", frozen frames). Flow runs on each sampled frame and the frame right after it,
downscaled to `width` pixels; the score is the mean flow magnitude in pixels per frame at
that width, averaged over the samples (so it does not depend on the clip's resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...frames import Frames
from ..base import Check
from .base import WeightFreeFrameFilter


@dataclass
class MotionConfig:
    min_motion: float | None = 0.02  # below: reason low_motion (pixels/frame at `width`)
    max_motion: float | None = None  # above: reason high_motion (shake, strobing)
    width: int = 160
    actor: bool = False  # run on the model actor pool (shares the model stages' decode)


def flow_magnitude(a: np.ndarray, b: np.ndarray) -> float:
    """Mean optical-flow magnitude between two gray frames of equal size."""
    # Farnebäck parameters from OpenCV's sample (samples/python/opt_flow.py)
    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return float(np.linalg.norm(flow, axis=2).mean())


def motion_score(gray: np.ndarray, gray_next: np.ndarray, width: int) -> float:
    """`gray`, `gray_next`: (N, H, W) uint8, each frame and its successor."""
    h, w = gray.shape[1:]
    size = (width, max(2, round(h * width / w)))
    mags = []
    for a, b in zip(gray, gray_next, strict=True):
        a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
        b = cv2.resize(b, size, interpolation=cv2.INTER_AREA)
        mags.append(flow_magnitude(a, b))
    return float(np.mean(mags))


class MotionFilter(WeightFreeFrameFilter):
    name = "motion"
    Config = MotionConfig
    score_columns = ("motion_score",)

    def score_frames(self, fr: Frames) -> dict[str, float | None]:
        return {"motion_score": motion_score(fr.gray(), fr.gray_nexts(), self.cfg.width)}

    def checks(self) -> list[Check]:
        return [
            Check("motion_score", ">=", self.cfg.min_motion, "low_motion"),
            Check("motion_score", "<=", self.cfg.max_motion, "high_motion"),
        ]
