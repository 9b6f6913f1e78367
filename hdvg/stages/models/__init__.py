"""Model-backed clip stages (run after the cut on the clip's frames). One file per stage;
weights resolve through `hdvg.models`; frames come from `hdvg.frames` (one decode per clip)."""

from .aesthetic import AestheticFilter
from .caption import CaptionStage
from .clip_score import ClipScoreFilter
from .latents import LatentsStage
from .motion import MotionFilter
from .overlay import ScanOverlayFilter, StaticOverlayFilter
from .text_area import TextAreaFilter
from .watermark import WatermarkFilter

STAGES = (ScanOverlayFilter, StaticOverlayFilter, MotionFilter, TextAreaFilter, WatermarkFilter, AestheticFilter,
          CaptionStage, ClipScoreFilter, LatentsStage)  # fmt: skip

__all__ = ["STAGES", "AestheticFilter", "CaptionStage", "ClipScoreFilter", "LatentsStage", "MotionFilter",
           "ScanOverlayFilter", "StaticOverlayFilter", "TextAreaFilter", "WatermarkFilter"]  # fmt: skip
