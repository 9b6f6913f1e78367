"""YouTube (and other sites yt-dlp knows) as sources: only the needed section, at a chosen
minimum height, through `python -m yt_dlp` in its own process group with a hard timeout.

Which URLs come here (`wants`): youtube.com / youtu.be by default, hosts listed in
`download.ytdlp.hosts`, and any URL written `ytdlp:https://...` (tests use this with
yt-dlp's generic extractor on a loopback server). Failures are classified from yt-dlp's
error text by `hdvg.download.classify_text` (`unavailable`, `private`, `login_required`,
`geo_blocked`, `rate_limited`, `bot_check`, `removed`, `timeout`, ..., else `other`).

Safety: the page URL's scheme and address are checked like any download; yt-dlp runs with
`--ignore-config` (no user config can add `--exec`), `--no-playlist`, a fixed output name
under OUT/.work (never a name from the URL) and hdvg's own ffmpeg. yt-dlp follows the
site's media URLs itself, so address checks cover the page URL, not every media hop; use
`download.ytdlp.proxy` to confine egress further.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, DownloadConfig, build
from .download import DownloadError, Fetched, check_host, classify_text, with_retries
from .ffmpeg import run_killable

PREFIX = "ytdlp:"
YOUTUBE_HOSTS = {"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com",
                 "youtu.be", "www.youtube-nocookie.com", "youtube-nocookie.com"}  # fmt: skip


@dataclass
class YtdlpConfig:
    """`download.ytdlp` in the pipeline YAML."""

    hosts: list[str] = field(default_factory=list)  # more hosts sent to yt-dlp
    min_height: int = 720  # formats below this are not downloaded (unknown height passes)
    max_height: int | None = None  # don't fetch 4K to keep 720p
    format: str | None = None  # a full yt-dlp -f expression instead of the height rule
    cookies: str | None = None  # Netscape cookies.txt (for login_required / bot_check)
    cookies_from_browser: str | None = None  # e.g. "firefox"
    proxy: str | None = None  # http://, https:// or socks5:// proxy URL
    timeout_s: float = 1800.0  # the whole yt-dlp run; its process group is killed after
    socket_timeout_s: float = 30.0
    sections: bool = True  # download only the span the task needs (--download-sections)
    section_margin_s: float = 1.0  # added before and after the needed span
    force_keyframes_at_cuts: bool = True  # re-encode at section edges: exact start time
    limit_rate: str | None = None  # e.g. "5M" bytes/s per download
    sleep_requests_s: float | None = None  # yt-dlp's own pause between page requests


def ytdlp_config(cfg: DownloadConfig) -> YtdlpConfig:
    try:
        return build(YtdlpConfig, cfg.ytdlp, "download.ytdlp")
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"download.ytdlp: {e}") from None


def strip_prefix(url: str) -> str:
    return url[len(PREFIX) :] if url.startswith(PREFIX) else url


def wants(url: str, cfg: DownloadConfig) -> bool:
    if url.startswith(PREFIX):
        return True
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return False
    host = (parsed.hostname or "").lower().rstrip(".")
    extra = {h.lower() for h in (cfg.ytdlp or {}).get("hosts", [])}
    return host in YOUTUBE_HOSTS or host in extra


def format_selector(yc: YtdlpConfig) -> str:
    if yc.format:
        return yc.format
    # `>=?`: formats of unknown height (direct links) pass; the probe and the resolution
    # filter judge them after download
    cond = f"[height>=?{yc.min_height}]"
    if yc.max_height:
        cond += f"[height<=?{yc.max_height}]"
    return f"bv*{cond}/b{cond}"


def _fmt_time(t: float) -> str:
    return f"{t:.3f}"


def build_command(url: str, out_dir: Path, yc: YtdlpConfig, cfg: DownloadConfig,
                  section: tuple[float, float | None] | None) -> list[str]:  # fmt: skip
    from .ffmpeg import ffmpeg_exe

    youtube = (urllib.parse.urlparse(url).hostname or "").lower() in YOUTUBE_HOSTS
    cmd = [
        sys.executable, "-m", "yt_dlp", "--ignore-config", "--no-playlist", "--no-cache-dir",
        "--no-progress", "--no-warnings", "--color", "never", "--newline",
        "--ffmpeg-location", ffmpeg_exe(),
        "-o", str(out_dir / "video.%(ext)s"),
        "-f", format_selector(yc), "-S", f"res:{yc.max_height or yc.min_height}",
        "--socket-timeout", str(yc.socket_timeout_s),
        "--retries", "1", "--fragment-retries", "3",  # hdvg retries the whole run itself
        "--max-filesize", str(cfg.max_bytes),
        "--user-agent", cfg.user_agent,
    ]  # fmt: skip
    if youtube:  # never fall back to the generic extractor on a YouTube URL
        cmd += ["--use-extractors", "youtube"]
    if section is not None:
        start, end = section
        cmd += [
            "--download-sections",
            f"*{_fmt_time(start)}-{'inf' if end is None else _fmt_time(end)}",
        ]
        cmd += ["--force-keyframes-at-cuts" if yc.force_keyframes_at_cuts
                else "--no-force-keyframes-at-cuts"]  # fmt: skip
    if yc.cookies:
        cmd += ["--cookies", yc.cookies]
    if yc.cookies_from_browser:
        cmd += ["--cookies-from-browser", yc.cookies_from_browser]
    if yc.proxy:
        cmd += ["--proxy", yc.proxy]
    if yc.limit_rate:
        cmd += ["--limit-rate", yc.limit_rate]
    if yc.sleep_requests_s:
        cmd += ["--sleep-requests", str(yc.sleep_requests_s)]
    return [*cmd, "--", url]


def classify(stderr: str) -> str:
    """A yt-dlp failure's reason, from its `ERROR:` lines (the last one is the cause)."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    text = "\n".join(errors[-2:]) or stderr[-2000:]
    return classify_text(text) or "other"


def run_ytdlp(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    # own process group: a timeout kills yt-dlp and the ffmpeg it runs
    res = run_killable(cmd, timeout_s, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res is None:
        raise DownloadError("timeout", f"yt-dlp exceeded {timeout_s:.0f}s")
    rc, out, err = res
    return rc, err.decode(errors="replace") + out.decode(errors="replace")[-2000:]


def fetch_ytdlp(url: str, dest: Path, cfg: DownloadConfig,
                section: tuple[float, float | None] | None = None) -> Fetched:  # fmt: skip
    """Download `url` (or its `section`, seconds) with yt-dlp into `dest`."""
    from .ratelimit import limiter

    yc = ytdlp_config(cfg)
    real = strip_prefix(url)
    parsed = urllib.parse.urlparse(real)
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https") or scheme not in cfg.allowed_schemes:
        raise DownloadError("scheme_not_allowed", f"yt-dlp URL scheme {scheme!r} refused")
    host = (parsed.hostname or "").lower()
    check_host(host, cfg)
    offset = 0.0
    if section is not None and yc.sections:
        start = max(0.0, section[0] - yc.section_margin_s)
        end = None if section[1] is None else section[1] + yc.section_margin_s
        section, offset = (start, end), start
        if start == 0.0 and end is None:
            section = None
    else:
        section = None
    work = dest.parent / f"{dest.stem}.ytdlp"
    cmd = build_command(real, work, yc, cfg, section)

    def once() -> Fetched:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with limiter(cfg).slot(host):
            code, log = run_ytdlp(cmd, yc.timeout_s)
        if code != 0:
            reason = classify(log)
            lines = log.splitlines()
            last = [ln for ln in lines if ln.startswith("ERROR:")][-1:] or lines[-1:]
            raise DownloadError(reason, f"yt-dlp: {' '.join(last)[:400]}")
        files = [p for p in work.iterdir() if p.is_file() and p.name.startswith("video.")
                 and not p.name.endswith((".part", ".ytdl", ".temp"))]  # fmt: skip
        if not files:
            # --max-filesize skips the download with exit status 0
            reason = "too_large" if "larger than max-filesize" in log else "other"
            raise DownloadError(reason, f"yt-dlp wrote no file: {log.strip()[-300:]}")
        path = max(files, key=lambda p: p.stat().st_size)
        size = path.stat().st_size
        if size == 0:
            raise DownloadError("empty", "yt-dlp wrote an empty file")
        if size > cfg.max_bytes:
            raise DownloadError("too_large", f"larger than {cfg.max_bytes} bytes")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        path.replace(dest)
        return Fetched(dest, size, h.hexdigest(), temporary=True, offset_s=offset)

    try:
        return with_retries(once, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
