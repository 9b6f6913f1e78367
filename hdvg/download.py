"""Fetch a source to local disk: local paths in place; http(s) streamed with caps,
timeouts, retries and address checks at every redirect; YouTube (and configured hosts)
through yt-dlp, only the span the task needs; any other fsspec URL copied.

Downloads are named by source id under OUT/.work/downloads, never by anything in the URL,
so a hostile name cannot write outside OUT. Every failure is a `DownloadError` whose
`reason` is a stable manifest code (see `records.REASONS`): HTTP statuses and yt-dlp's
messages map onto one taxonomy (`not_found`, `removed`, `private`, `login_required`,
`geo_blocked`, `rate_limited`, `bot_check`, `forbidden`, `timeout`, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .config import DownloadConfig
from .records import SourceTask

CHUNK = 1 << 16
SNIFF_BYTES = 64 * 1024  # how much of a text/HTML answer is read to say why it is not a video
MAX_RETRY_AFTER_S = 60.0  # a server's Retry-After is honoured up to this


class DownloadError(RuntimeError):
    def __init__(self, reason: str, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None):  # fmt: skip
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class Fetched:
    path: Path
    size_bytes: int
    sha256: str
    temporary: bool  # delete after processing
    offset_s: float = 0.0  # the file starts this far into the source (a downloaded section)


# HTTP status → reason. 5xx not listed: `http_error`, retried.
HTTP_REASONS = {
    401: "login_required",
    403: "forbidden",
    404: "not_found",
    407: "login_required",
    408: "timeout",
    410: "removed",
    429: "rate_limited",
    451: "geo_blocked",  # RFC 7725: unavailable for legal reasons, i.e. in this jurisdiction
    504: "timeout",
}
RETRYABLE = {"timeout", "network_error", "rate_limited"}

# What a page or a tool's error text says → reason. Ordered: the first match wins, so the
# specific classes come before the generic ones (YouTube's bot check says "Sign in", and
# yt-dlp appends a "--cookies" hint to every sign-in message). The phrases are YouTube's
# playability reasons as yt-dlp relays them (yt_dlp/extractor/youtube/_video.py) and
# yt-dlp's own messages (extractor/common.py raise_login_required / raise_geo_restricted).
TEXT_REASONS: list[tuple[str, re.Pattern[str]]] = [
    ("bot_check", re.compile(r"not a bot|captcha|unusual traffic|automated queries", re.I)),
    (
        "rate_limited",
        re.compile(r"HTTP Error 429|Too Many Requests|rate[- ]limit|try again later", re.I),
    ),
    ("private", re.compile(r"private video|video is private|\bis private\b", re.I)),
    (
        "geo_blocked",
        re.compile(
            r"in your country|from your location|geo[ _-]?restrict|HTTP Error 451|"
            r"not available in your region",
            re.I,
        ),
    ),
    (
        "removed",
        re.compile(
            r"has been removed|been terminated|copyright claim|violat\w+ YouTube|"
            r"no longer available|HTTP Error 410|video has been deleted",
            re.I,
        ),
    ),
    (
        "login_required",
        re.compile(
            r"sign in|log ?in|registered users|members[- ]only|join this channel|"
            r"--cookies|HTTP Error 40[17]|confirm your age|age[- ]restricted",
            re.I,
        ),
    ),
    ("timeout", re.compile(r"timed out|timeout|HTTP Error 40[8]|HTTP Error 504", re.I)),
    ("forbidden", re.compile(r"HTTP Error 403", re.I)),
    ("no_format", re.compile(r"Requested format is not available|No video formats found", re.I)),
    (
        "unavailable",
        re.compile(
            r"video unavailable|is not available|is unavailable|does not exist|"
            r"HTTP Error 404|not found",
            re.I,
        ),
    ),
    ("not_video", re.compile(r"Unsupported URL|no video could be found", re.I)),
]


def classify_text(text: str) -> str | None:
    """Reason for an error message or an error page's text; None when nothing matches."""
    for reason, pattern in TEXT_REASONS:
        if pattern.search(text):
            return reason
    return None


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scheme_of(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    # a bare path (or a Windows drive letter) is a local file
    return "file" if len(parsed.scheme) <= 1 else parsed.scheme.lower()


def check_host(host: str | None, cfg: DownloadConfig) -> None:
    """Resolve `host` and refuse private, loopback, link-local (cloud metadata) and reserved
    addresses unless the config allows them. `download.allow_private_hosts` still refuses
    link-local addresses (169.254.169.254 serves cloud credentials), unless
    `download.allowed_hosts` names the host itself."""
    if not host:
        raise DownloadError("host_not_allowed", "URL has no host")
    host = host.lower().rstrip(".")
    listed = {h.lower() for h in cfg.allowed_hosts}
    if cfg.allowed_hosts and host not in listed:
        raise DownloadError("host_not_allowed", f"host {host} not in download.allowed_hosts")
    if cfg.allow_private_hosts and host in listed:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        if cfg.allow_private_hosts:  # the fetch itself reports it
            return
        raise DownloadError("network_error", f"cannot resolve {host}: {e}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if cfg.allow_private_hosts:
            if ip.is_link_local:
                raise DownloadError(
                    "host_not_allowed",
                    f"{host} resolves to link-local address {ip} (cloud metadata); name it "
                    "in download.allowed_hosts to fetch from it",
                )
        elif not ip.is_global or ip.is_multicast:
            raise DownloadError(
                "host_not_allowed",
                f"{host} resolves to non-public address {ip} (set download.allow_private_hosts)",
            )


def fetch(url: str, dest: Path, cfg: DownloadConfig,
          section: tuple[float, float | None] | None = None) -> Fetched:  # fmt: skip
    """Fetch one source. `section` (seconds) limits a yt-dlp download to what is needed;
    other schemes fetch the whole file (their `offset_s` is 0)."""
    from . import ytdlp

    if ytdlp.wants(url, cfg):
        return ytdlp.fetch_ytdlp(url, dest, cfg, section)
    scheme = scheme_of(url)
    if scheme not in cfg.allowed_schemes:
        raise DownloadError(
            "scheme_not_allowed", f"scheme {scheme!r} not in download.allowed_schemes"
        )
    if scheme == "file":
        path = Path(
            urllib.parse.unquote(urllib.parse.urlparse(url).path)
            if url.startswith("file:")
            else url
        )
        if not path.exists():
            raise DownloadError("not_found", f"no such file: {path}")
        if not path.is_file():  # a FIFO or device would block or never end
            raise DownloadError("not_a_file", f"not a regular file: {path}")
        size = path.stat().st_size
        if size == 0:
            raise DownloadError("empty", "zero-byte file")
        return Fetched(path, size, _hash_file(path), temporary=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("http", "https"):
        return _fetch_http(url, dest, cfg)
    return _fetch_fsspec(url, dest, cfg)


def fetch_task(task: SourceTask, dest: Path, cfg: DownloadConfig) -> tuple[Fetched, SourceTask]:
    """Fetch a task's source; when only a section was downloaded, return the task with its
    times (given scenes, start/end) shifted into the downloaded file's clock."""
    fetched = fetch(task.url, dest, cfg, needed_section(task))
    off = fetched.offset_s
    if not off:
        return fetched, task

    def sh(t: float | None) -> float | None:
        return None if t is None else max(0.0, t - off)

    given = None
    if task.given_scenes is not None:
        given = [dataclasses.replace(g, start_s=sh(g.start_s), end_s=sh(g.end_s))
                 for g in task.given_scenes]  # fmt: skip
    shifted = dataclasses.replace(task, given_scenes=given, start_s=sh(task.start_s),
                                  end_s=sh(task.end_s))  # fmt: skip
    return fetched, shifted


def needed_section(task: SourceTask) -> tuple[float, float | None] | None:
    """The one span of the source that covers every clip the task can produce, or None
    for the whole source. (One covering section, not one per scene: the pipeline works on
    one file per source, and HD-VG's spans of one video are usually contiguous.)"""
    if task.given_scenes:
        start = min(g.start_s for g in task.given_scenes)
        ends = [g.end_s for g in task.given_scenes]
        return (start, None if any(e is None for e in ends) else max(ends))  # type: ignore[type-var]
    if task.start_s is not None or task.end_s is not None:
        return (task.start_s or 0.0, task.end_s)
    return None


def _fetch_fsspec(url: str, dest: Path, cfg: DownloadConfig) -> Fetched:
    import fsspec

    tmp = dest.with_suffix(".part")
    h = hashlib.sha256()
    size = 0
    try:
        with fsspec.open(url, "rb") as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise DownloadError("too_large", f"larger than {cfg.max_bytes} bytes")
                h.update(chunk)
                out.write(chunk)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise DownloadError("not_found", f"no such object: {url}") from None
    except DownloadError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - any filesystem error is this source's failure
        tmp.unlink(missing_ok=True)
        raise DownloadError("network_error", f"{type(e).__name__}: {e}") from None
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise DownloadError("empty", "zero-byte object")
    tmp.replace(dest)
    return Fetched(dest, size, h.hexdigest(), temporary=True)


def with_retries(fn, cfg: DownloadConfig):
    """Call `fn()`; retry retryable `DownloadError`s (timeouts, network errors, 5xx, 429)
    up to `cfg.retries` times with exponential backoff and jitter, honouring Retry-After."""
    attempt = 0
    while True:
        try:
            return fn()
        except DownloadError as e:
            retryable = e.reason in RETRYABLE or (e.status or 0) >= 500
            if not retryable or attempt >= cfg.retries:
                raise
            delay = cfg.backoff_s * (2**attempt) * (0.5 + random.random() / 2)
            if e.retry_after_s is not None:
                delay = max(delay, min(e.retry_after_s, MAX_RETRY_AFTER_S))
            time.sleep(delay)
            attempt += 1


def _fetch_http(url: str, dest: Path, cfg: DownloadConfig) -> Fetched:
    import requests

    from .ratelimit import limiter

    host = urllib.parse.urlparse(url).hostname or ""

    def once() -> Fetched:
        with limiter(cfg).slot(host):
            return _http_once(url, dest, cfg, requests)

    return with_retries(once, cfg)


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _not_video(resp, first: bytes, ctype: str) -> DownloadError:
    """A text/HTML answer: read a little and say why it is not a video."""
    text = first
    try:
        for chunk in resp.iter_content(CHUNK):
            text += chunk
            if len(text) >= SNIFF_BYTES:
                break
    except Exception:  # noqa: BLE001 - we only want a hint from the page
        pass
    words = text[:SNIFF_BYTES].decode("utf-8", errors="replace")
    words = re.sub(r"<[^>]*>", " ", words)
    reason = classify_text(words)
    if reason in (None, "not_video", "unavailable", "no_format", "timeout"):
        reason = "not_video"
    snippet = " ".join(words.split())[:120]
    return DownloadError(reason, f"got {ctype or 'a text page'}, not a video: {snippet!r}")


_TEXT_TYPES = re.compile(r"^(text/|application/(json|xml|xhtml\+xml|javascript))", re.I)


def _http_once(url: str, dest: Path, cfg: DownloadConfig, requests) -> Fetched:
    current = url
    tmp = dest.with_suffix(".part")
    for _hop in range(cfg.max_redirects + 1):
        parsed = urllib.parse.urlparse(current)
        scheme = parsed.scheme.lower()
        if scheme not in ("http", "https") or scheme not in cfg.allowed_schemes:
            raise DownloadError("scheme_not_allowed", f"redirect to scheme {scheme!r} refused")
        check_host(parsed.hostname, cfg)
        try:
            resp = requests.get(
                current,
                stream=True,
                allow_redirects=False,
                timeout=(cfg.connect_timeout_s, cfg.read_timeout_s),
                headers={"User-Agent": cfg.user_agent},
            )
        except requests.exceptions.Timeout as e:
            raise DownloadError("timeout", f"{type(e).__name__}: {e}") from None
        except requests.exceptions.RequestException as e:
            raise DownloadError("network_error", f"{type(e).__name__}: {e}") from None
        with resp:
            if resp.status_code in (301, 302, 303, 307, 308):
                loc = resp.headers.get("Location")
                if not loc:
                    raise DownloadError(
                        "http_error", f"redirect {resp.status_code} without Location"
                    )
                current = urllib.parse.urljoin(current, loc)
                continue
            if resp.status_code != 200:
                code = resp.status_code
                raise DownloadError(
                    HTTP_REASONS.get(code, "http_error"), f"HTTP {code} {resp.reason or ''}".strip(),
                    status=code, retry_after_s=_retry_after(resp.headers.get("Retry-After")),
                )  # fmt: skip
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
                raise DownloadError("too_large", f"Content-Length {declared} > {cfg.max_bytes}")
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
            if _TEXT_TYPES.match(ctype):
                raise _not_video(resp, b"", ctype)
            return _stream_body(resp, declared, dest, tmp, cfg, requests, ctype)
    raise DownloadError("http_error", f"more than {cfg.max_redirects} redirects")


def _stream_body(resp, declared, dest: Path, tmp: Path, cfg: DownloadConfig, requests,
                 ctype: str) -> Fetched:  # fmt: skip
    # The read timeout bounds each socket read, not the download: a server dripping a byte
    # every few seconds would hold a worker forever. A timer closes the response instead.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        try:
            resp.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # unblocks a pending read
        except Exception:  # noqa: BLE001 - fall back to close()
            resp.close()

    timer = threading.Timer(cfg.total_timeout_s, expire)
    timer.daemon = True
    timer.start()
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in resp.iter_content(CHUNK):
                if size == 0 and chunk.lstrip()[:1] == b"<":
                    # HTML/XML served as a "video": no container starts with '<'
                    raise _not_video(resp, chunk, ctype)
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise DownloadError("too_large", f"larger than {cfg.max_bytes} bytes")
                h.update(chunk)
                out.write(chunk)
                if expired.is_set():
                    break
    except DownloadError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - requests/urllib3 errors, or the socket we shut
        tmp.unlink(missing_ok=True)
        if expired.is_set():
            raise DownloadError(
                "timeout", f"download exceeded {cfg.total_timeout_s:.0f}s"
            ) from None
        reason = "timeout" if "timed out" in str(e).lower() else "network_error"
        raise DownloadError(reason, f"{type(e).__name__}: {e}") from None
    finally:
        timer.cancel()
    if expired.is_set():
        tmp.unlink(missing_ok=True)
        raise DownloadError("timeout", f"download exceeded {cfg.total_timeout_s:.0f}s")
    if declared and declared.isdigit() and int(declared) != size:
        tmp.unlink(missing_ok=True)
        raise DownloadError("network_error", f"got {size} bytes, Content-Length said {declared}")
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise DownloadError("empty", "zero-byte response")
    tmp.replace(dest)
    return Fetched(dest, size, h.hexdigest(), temporary=True)
