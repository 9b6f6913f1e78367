"""HD-VG-130M released metadata as a source list: the scenes are given, not detected.

The release (https://github.com/daooshee/HD-VG-130M, files `hdvg_*.json`) is a JSON list,
one entry per source video::

    {"url": "https://www.youtube.com/watch?v=ID",
     "clip": {"ID.8.mp4": {"span": ["00:01:46.479", "00:01:57.009"], "fps": 30.0,
                           "scene_split": [{"scene_cut": [9, 37], "clip_id": "ID.8_1",
                                            "caption": "a street that has power lines down"},
                                           ...]}}}

`clip` holds HD-VILA-100M clips (`span` in the source); `scene_split` the HD-VG scenes
inside each, `scene_cut` = [start_frame, end_frame) counted from the span start at the
clip's `fps`, `[0, -1]` meaning the whole span. Scenes are not sorted, and some are only
2-4 frames long (the duration filter drops those as `too_short`). The official cutting
script seeks to `start + 1` and stops before `end` with OpenCV; scenes tile their span
([0, 9], [9, 37], ...), so we read them as half-open frame ranges, which differs from that
script by at most one frame.

Also read: a dict keyed by video id (some copies of the release), HD-VILA-style entries
whose `clip` is a list of `{"clip_id", "span"}`, and `scenes` / `scene` as the scene key.
Entries that repeat a URL are merged into one source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .records import GivenScene, SourceTask, source_id_for

SCENE_KEYS = ("scene_split", "scenes", "scene")
_HMS = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


def _error(msg: str):
    from .sources import SourceListError

    return SourceListError(msg)


def parse_time(t: Any, where: str) -> float:
    """'HH:MM:SS.mmm' (or 'MM:SS.mmm', or a number of seconds) → seconds."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    m = _HMS.match(str(t).strip())
    if not m:
        raise _error(f"{where}: bad time {t!r} (want HH:MM:SS.mmm)")
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi) * 60 + float(s)


def _clips(entry: dict[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    clips = entry.get("clip") or entry.get("clips") or {}
    if isinstance(clips, dict):
        return sorted(clips.items())
    if isinstance(clips, list):  # HD-VILA style: [{"clip_id": "ID.1.mp4", "span": [...]}]
        return [(str(c.get("clip_id", i)), c) for i, c in enumerate(clips) if isinstance(c, dict)]
    raise _error(f"{where}: 'clip' must be a mapping or a list")


def _scenes_of(name: str, clip: dict[str, Any], where: str) -> list[GivenScene]:
    span = clip.get("span")
    if not isinstance(span, (list, tuple)) or len(span) != 2:
        raise _error(f"{where}: clip {name} has no span [start, end]")
    span_start = parse_time(span[0], f"{where} {name}")
    span_end = parse_time(span[1], f"{where} {name}")
    if span_end <= span_start:
        raise _error(f"{where}: clip {name} span ends before it starts")
    scenes = next((clip[k] for k in SCENE_KEYS if k in clip), None)
    base_id = name[:-4] if name.endswith(".mp4") else name
    if scenes is None:  # an HD-VILA clip without scene splits: the whole span
        scenes = [{"scene_cut": [0, -1], "clip_id": base_id, "caption": clip.get("caption")}]
    fps = clip.get("fps")
    out = []
    for k, sc in enumerate(scenes):
        cut = sc.get("scene_cut", [0, -1]) if isinstance(sc, dict) else None
        if (not isinstance(cut, (list, tuple)) or len(cut) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in cut)):  # fmt: skip
            raise _error(f"{where}: clip {name} scene {k}: scene_cut must be [start, end] frames")
        a, b = cut
        whole = b == -1
        if not whole and (a < 0 or b <= a):
            raise _error(f"{where}: clip {name} scene {k}: bad scene_cut {list(cut)}")
        if (a or not whole) and not (isinstance(fps, (int, float)) and fps > 0):
            raise _error(f"{where}: clip {name} has frame cuts but no fps")
        start = span_start + (a / fps if a else 0.0)
        end = span_end if whole else span_start + b / fps
        caption = sc.get("caption")
        clip_id = sc.get("clip_id") or f"{base_id}_{k}"
        out.append(GivenScene(start, end, str(clip_id), None if caption is None else str(caption)))
    return out


def _video_id(entry: dict[str, Any], key: str | None, names: list[str]) -> str | None:
    for v in (entry.get("video_id"), entry.get("id"), key):
        if v:
            return str(v)
    if names:  # "ID.8.mp4" → "ID" (YouTube ids may contain '.'? they do not: [A-Za-z0-9_-])
        return names[0].split(".")[0]
    return None


def read_hdvg_metadata(path: str | Path) -> list[SourceTask]:
    """One task per source video; every scene of every clip becomes a given scene."""
    try:
        data = json.loads(Path(path).read_text())
    except Exception as e:  # noqa: BLE001 - any read/parse failure is one clear error
        raise _error(f"cannot read HD-VG metadata {path}: {e}") from None
    if isinstance(data, dict):
        # one entry, or {video_id: entry, ...}
        items = [(None, data)] if "url" in data else list(data.items())
    elif isinstance(data, list):
        items = [(None, e) for e in data]
    else:
        raise _error(f"{path}: expected a JSON list of sources")
    by_url: dict[str, SourceTask] = {}
    for order, (key, entry) in enumerate(items):
        where = f"{path}: entry {key if key is not None else order}"
        if not isinstance(entry, dict) or not entry.get("url"):
            raise _error(f"{where} has no url")
        url = str(entry["url"]).strip()
        clips = _clips(entry, where)
        if not clips:  # no scenes given would silently turn into our own detection
            raise _error(f"{where} has no clips")
        scenes = [s for name, clip in clips for s in _scenes_of(name, clip, where)]
        task = by_url.get(url)
        if task is None:
            task = by_url[url] = SourceTask(
                len(by_url), url, source_id_for(url), given_scenes=[],
                input_id=_video_id(entry, key, [n for n, _ in clips]),
            )  # fmt: skip
        seen = {g.clip_id for g in task.given_scenes or []}
        task.given_scenes += [s for s in scenes if s.clip_id not in seen]  # type: ignore[operator]
    for task in by_url.values():
        task.given_scenes.sort(key=lambda s: (s.start_s, s.end_s, s.clip_id or ""))  # type: ignore[union-attr]
    return list(by_url.values())
