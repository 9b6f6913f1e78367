"""Model-backed clip stages (run after the cut on the clip's frames). One file per stage;
weights resolve through `hdvg.models`; frames come from `hdvg.frames` (one decode per clip)."""

from .motion import MotionFilter
from .overlay import StaticOverlayFilter
from .text_area import TextAreaFilter

STAGES = (StaticOverlayFilter, MotionFilter, TextAreaFilter)

__all__ = ["STAGES", "MotionFilter", "StaticOverlayFilter", "TextAreaFilter"]
