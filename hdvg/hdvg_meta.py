"""HD-VG-130M released metadata as a source list (the `scene_cut` spans are given)."""

from __future__ import annotations

import json
from pathlib import Path

from .records import GivenScene, SourceTask, source_id_for


def _hms(t: str) -> float:
    h, m, s = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def read_hdvg_metadata(path: str | Path) -> list[SourceTask]:
    """One task per source video; every scene of every HD-VILA clip becomes a given scene.

    `scene_cut` frames are relative to the clip's `span` start at the clip's `fps`;
    `[0, -1]` means the whole span.
    """
    from .sources import SourceListError

    try:
        data = json.loads(Path(path).read_text())
    except Exception as e:  # noqa: BLE001
        raise SourceListError(f"cannot read HD-VG metadata {path}: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise SourceListError(f"{path}: expected a JSON list of sources")
    tasks: list[SourceTask] = []
    for order, entry in enumerate(data):
        if not isinstance(entry, dict) or "url" not in entry:
            raise SourceListError(f"{path}: entry {order} has no url")
        scenes: list[GivenScene] = []
        for _name, clip in sorted((entry.get("clip") or {}).items()):
            span = clip.get("span") or ["00:00:00.000", None]
            span_start = _hms(span[0])
            span_end = _hms(span[1]) if span[1] else None
            fps = float(clip.get("fps") or 30.0)
            for sc in clip.get("scene") or clip.get("scenes") or []:
                a, b = sc.get("scene_cut", [0, -1])
                start = span_start + a / fps
                end = span_end if b == -1 else span_start + b / fps
                scenes.append(
                    GivenScene(start, end, sc.get("clip_id"), sc.get("caption"))
                )
        scenes.sort(key=lambda s: (s.start_s, s.end_s or 0))
        url = entry["url"]
        tasks.append(
            SourceTask(order, url, source_id_for(url), given_scenes=scenes, input_id=entry.get("id"))
        )
    return tasks
