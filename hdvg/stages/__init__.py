"""Stage registry: YAML names → stage classes. Other modules register by importing here."""

from __future__ import annotations

from .base import Check, Filter, Stage, StageContext
from .filters import AspectFilter, DurationFilter, LetterboxFilter, ResolutionFilter
from .models import STAGES as MODEL_STAGES

REGISTRY: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (DurationFilter, ResolutionFilter, AspectFilter, LetterboxFilter, *MODEL_STAGES)
}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator for stages defined outside this package."""
    REGISTRY[cls.name] = cls
    return cls


def build_stage(name: str, params: dict) -> Stage:
    from ..config import build

    cls = REGISTRY[name]
    return cls(build(cls.Config, params, name))


__all__ = ["REGISTRY", "Check", "Filter", "Stage", "StageContext", "build_stage", "register"]
