"""Stage family base classes. A concrete filter is a config dataclass plus `score()`."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..records import Clip, Decision, Probe

_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass
class Check:
    """A threshold from the YAML: `score column OP threshold` must hold, else `reason`."""

    column: str
    op: str
    threshold: float | None
    reason: str


@dataclass
class StageContext:
    """What a stage may read about the clip's source."""

    probe: Probe | None = None


class Stage:
    """A step applied to clips.

    `needs`: "meta" stages run before the cut on the source's probe and the frames kept
    from scene detection (cheap: rejected clips are never cut); "clip" stages run after
    the cut on the clip's mp4 bytes. `uses_model` stages load weights in `setup()` and run
    on a Ray actor pool (GPU when available), so weights load once per actor.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    needs: ClassVar[str] = "meta"
    uses_model: ClassVar[bool] = False
    score_columns: ClassVar[tuple[str, ...]] = ()
    # frame readers (model stages): "middle" or "spread" (see `hdvg.frames.spec_for`), and
    # the recipe's frames (`FrameSpec`), set on each stage by the model actor
    frame_use: ClassVar[str | None] = None
    frame_spec: Any = None
    # after its `prepare` (frame pool), the stage reads only what that left on the clip: the
    # pool may drop the decoded frames, and the mp4 bytes if no other model stage reads them
    pool_ready: ClassVar[bool] = False

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def setup(self) -> None:
        """Load models or other per-worker resources; called once per worker/actor."""

    def process_batch(self, clips: list[Clip], ctx: list[StageContext]) -> None:
        for clip, c in zip(clips, ctx, strict=True):
            self.process(clip, c)

    def process(self, clip: Clip, ctx: StageContext) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """For `hdvg models` and run.json: what this stage uses."""
        return {"stage": self.name, "model": None}


class Filter(Stage):
    """Score first, decide second: `score()` fills score columns for every clip it sees;
    `checks()` turns the YAML thresholds into decisions with stable reason codes."""

    def score(self, clip: Clip, ctx: StageContext) -> dict[str, float | None]:
        raise NotImplementedError

    def checks(self) -> list[Check]:
        raise NotImplementedError

    def process(self, clip: Clip, ctx: StageContext) -> None:
        self.apply(clip, self.score(clip, ctx))

    def apply(self, clip: Clip, scores: dict[str, float | None]) -> None:
        clip.scores.update(scores)
        for chk in self.checks():
            if chk.threshold is None:
                continue
            value = scores.get(chk.column)
            passed = value is not None and _OPS[chk.op](value, chk.threshold)
            clip.decide(
                Decision(self.name, chk.column, value, chk.op, chk.threshold, passed, chk.reason)
            )
