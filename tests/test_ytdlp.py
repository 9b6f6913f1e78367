"""yt-dlp as a subprocess against a loopback server (its generic extractor): sections,
the command it is given, and every failure class from real yt-dlp error output."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hdvg import media
from hdvg.config import DownloadConfig
from hdvg.download import DownloadError
from hdvg.media import VideoSpec
from hdvg.records import REASONS
from hdvg.ytdlp import YtdlpConfig, build_command, classify, fetch_ytdlp, wants
from tests.httpserver import LocalServer, Route


def _cfg(**yt) -> DownloadConfig:
    yt = {"min_height": 100, "timeout_s": 60.0, "socket_timeout_s": 5.0, **yt}
    return DownloadConfig(allow_private_hosts=True, retries=0, backoff_s=0.01, ytdlp=yt)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("yt")
    media.make_video(root / "v.mp4", VideoSpec(320, 180, 25, (1.0, 1.0, 1.0)))
    with LocalServer(root, lifetime_s=170) as s:
        yield s


def test_routing_and_command(tmp_path):
    cfg = DownloadConfig(ytdlp={"hosts": ["videos.example.org"]})
    assert wants("https://www.youtube.com/watch?v=abc", cfg)
    assert wants("https://youtu.be/abc", cfg)
    assert wants("https://videos.example.org/v/1", cfg)
    assert wants("ytdlp:http://127.0.0.1:9/x", cfg)
    assert not wants("https://example.org/v.mp4", cfg)
    assert not wants("/data/youtube.com.mp4", cfg)
    yc = YtdlpConfig(min_height=720, max_height=1080, cookies="/c.txt", proxy="socks5://p:1")
    cmd = build_command("https://www.youtube.com/watch?v=abc", tmp_path, yc, cfg, (10.0, 20.5))
    s = " ".join(cmd)
    assert "--ignore-config" in cmd and "--no-playlist" in cmd
    assert "bv*[height>=?720][height<=?1080]/b[height>=?720][height<=?1080]" in cmd
    assert "--download-sections *10.000-20.500" in s and "--force-keyframes-at-cuts" in cmd
    assert "--cookies /c.txt" in s and "--proxy socks5://p:1" in s
    assert "--use-extractors youtube" in s  # a YouTube URL never falls back to generic
    assert cmd[cmd.index("-o") + 1] == str(tmp_path / "video.%(ext)s")  # never a URL name
    assert cmd[-2:] == ["--", "https://www.youtube.com/watch?v=abc"]  # a URL is never an option


def _duration(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        n = sum(1 for _ in c.demux(vs) if _.pts is not None)
        return n / float(vs.average_rate)


def test_section_download(srv, tmp_path):
    cfg = _cfg(section_margin_s=0.25)
    got = fetch_ytdlp("ytdlp:" + srv.file_url("v.mp4"), tmp_path / "s.bin", cfg, (1.5, 2.5))
    assert got.offset_s == pytest.approx(1.25) and got.path == tmp_path / "s.bin"
    assert _duration(got.path) == pytest.approx(1.5, abs=0.1)  # only the section came down
    assert os.listdir(tmp_path) == ["s.bin"]  # yt-dlp's work folder is gone


FAILURES = {  # route → (status, reason phrase or None, expected reason)
    "/e403": (403, None, "forbidden"),
    "/e404": (404, None, "unavailable"),
    "/e410": (410, None, "removed"),
    "/e429": (429, None, "rate_limited"),
    "/e451": (451, None, "geo_blocked"),
    "/e401": (401, None, "login_required"),
    # a server's own words, relayed by yt-dlp in its error line
    "/bot": (403, "Sign in to confirm you're not a bot", "bot_check"),
    "/private": (403, "Private video", "private"),
    "/geo": (403, "The uploader has not made this video available in your country", "geo_blocked"),
    "/removed": (404, "This video has been removed by the uploader", "removed"),
    "/login": (403, "Sign in to view this video", "login_required"),
}  # fmt: skip


def test_failure_classes(srv, tmp_path):
    for path, (status, phrase, _) in FAILURES.items():
        srv.route(path, Route(status=status, reason=phrase, body="no", content_type="text/plain"))
    srv.html("/page", "<html><body><p>just a page, no video</p></body></html>")
    srv.route("/small", Route(file=Path(srv.root) / "v.mp4", content_type="video/mp4"))
    cases = {p: r for p, (_, _, r) in FAILURES.items()} | {"/page": "not_video"}

    def run(path: str) -> str:
        try:
            fetch_ytdlp("ytdlp:" + srv.url(path), tmp_path / path.strip("/") / "d.bin", _cfg())
        except DownloadError as e:
            return e.reason
        return "downloaded"

    with ThreadPoolExecutor(4) as pool:  # each run is a fresh Python: overlap the start-ups
        got = dict(zip(cases, pool.map(run, cases), strict=True))
    assert got == cases
    assert all(r in REASONS for r in got.values())


def test_timeout_kills_the_process_group(srv, tmp_path):
    srv.route("/hang", Route(body=b"x" * 1000, content_type="video/mp4", hang_s=25))
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as e:
        fetch_ytdlp("ytdlp:" + srv.url("/hang"), tmp_path / "d.bin", _cfg(timeout_s=4.0))
    assert e.value.reason == "timeout" and time.monotonic() - t0 < 15


def test_refuses_before_running(srv, tmp_path):
    cfg = DownloadConfig(ytdlp={"min_height": 100})  # loopback not allowed by default
    with pytest.raises(DownloadError) as e:
        fetch_ytdlp("ytdlp:" + srv.file_url("v.mp4"), tmp_path / "d.bin", cfg)
    assert e.value.reason == "host_not_allowed"
    with pytest.raises(DownloadError) as e:
        fetch_ytdlp("ytdlp:file:///etc/passwd", tmp_path / "d.bin", _cfg())
    assert e.value.reason == "scheme_not_allowed"


# The messages the classifier relies on, checked against the installed yt-dlp's source, so
# an upgrade that rewords them fails here instead of silently turning into `other`.
VERBATIM = {
    "extractor/youtube/_video.py": [
        "The uploader has not made this video available in your country",
        "YouTube is requiring a captcha challenge before playback",
        "has been rate-limited by YouTube",
        "This content isn't available, try again later",
    ],
    "extractor/common.py": [
        "This video is only available for registered users",
        "This video is not available from your location due to geo restriction",
    ],
    "YoutubeDL.py": ["Requested format is not available"],
    "utils/_utils.py": ["Unsupported URL"],
}


def test_ytdlp_messages_verbatim():
    import yt_dlp

    root = Path(yt_dlp.__file__).parent
    for rel, phrases in VERBATIM.items():
        src = (root / rel).read_text(encoding="utf-8")
        for p in phrases:
            assert p in src, (rel, p)
    assert classify("ERROR: [youtube] x: " + VERBATIM["extractor/common.py"][0]) == "login_required"
    assert classify("ERROR: [youtube] x: " + VERBATIM["extractor/common.py"][1]) == "geo_blocked"
    assert (
        classify(
            "ERROR: [youtube] x: Video unavailable. " + VERBATIM["extractor/youtube/_video.py"][1]
        )
        == "bot_check"
    )
    assert classify("ERROR: something nobody has seen before") == "other"
