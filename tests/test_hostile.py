"""Hostile inputs: a corpus made here, served by real HTTP servers on loopback, curated by a
real Ray job. Each bad source must become one `failed` row with its own reason, the job must
finish, and nothing may be written outside OUT (nor any request made that the config forbids).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdvg import ffmpeg, media
from hdvg.config import DownloadConfig, load_pipeline
from hdvg.download import DownloadError, fetch
from hdvg.media import VideoSpec
from hdvg.records import REASONS

ROOT = Path(__file__).resolve().parents[1]
MARK = f"hdvgpwn{uuid.uuid4().hex[:8]}"  # a name that must never appear on disk


class Server:
    """A loopback HTTP server with scripted routes; records every path it was asked for."""

    def __init__(self, routes: dict[str, object]):
        self.routes, self.hits = routes, []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                srv.hits.append(self.path)
                route = srv.routes.get(self.path.split("?")[0])
                if route is None and self.path.endswith(f"{MARK}.mp4"):
                    route = srv.routes["/good.mp4"]
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif callable(route):
                    route(self)
                else:
                    body, ctype = route
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _redirect(location: str):
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return handle


def _lying_length(body: bytes):
    """Declares twice the bytes it sends, then hangs up."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(2 * len(body)))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.close_connection = True

    return handle


def _stall(h: BaseHTTPRequestHandler) -> None:
    """Headers and a few bytes, then nothing (the client's read timeout must fire)."""
    h.send_response(200)
    h.send_header("Content-Length", "1000000")
    h.end_headers()
    h.wfile.write(b"\x00\x00\x00\x18ftypmp42")
    h.wfile.flush()
    time.sleep(8)


def _snapshot(d: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(d))] = (
                p.stat().st_size,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
        else:
            out[str(p.relative_to(d))] = (-1, "")
    return out


def _marked(*dirs: Path) -> list[str]:
    """Files a shell (or an unescaped URL path) would have made from the hostile names."""
    return [str(p) for d in dirs for p in d.rglob("*") if p.name in (MARK, f"{MARK}.mp4")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    good = media.make_video(d / "good.mp4", VideoSpec(1280, 720, 25, (2.5,)))
    data = good.read_bytes()
    files = {
        "zero.mp4": b"",
        "truncated.mp4": data[: len(data) // 3],
        "random.mp4": hashlib.sha256(b"seed").digest() * 2000,  # 64 kB of noise, seeded
        "page.mp4": b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n",
    }
    for name, body in files.items():
        (d / name).write_bytes(body)
    ffmpeg.run(["-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac",
                str(d / "audio_only.mp4")], 60)  # fmt: skip
    ffmpeg.run(["-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25", "-frames:v", "1",
                "-c:v", "libx264", "-preset", "ultrafast", str(d / "one_frame.mp4")], 60)  # fmt: skip
    # a real stream whose header declares 8448x8448 (> probe.max_pixels): bad_header
    ffmpeg.run(["-y", "-f", "lavfi", "-i", "color=c=gray:size=8448x8448:rate=1", "-frames:v", "1",
                "-c:v", "libx264", "-preset", "ultrafast", str(d / "huge.mp4")], 60)  # fmt: skip
    # a decompression bomb: 5000 4K frames in 6 MB; its decode outlives scenes.timeout_s
    ffmpeg.run(["-y", "-f", "lavfi", "-i", "color=c=gray:size=4096x2304:rate=25", "-frames:v",
                "25", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25",
                str(d / "bomb1.mp4")], 60)  # fmt: skip
    ffmpeg.run(["-y", "-stream_loop", "199", "-i", str(d / "bomb1.mp4"), "-c", "copy",
                str(d / "bomb.mp4")], 60)  # fmt: skip
    (d / "bomb1.mp4").unlink()
    os.mkfifo(d / "fifo.mp4")  # open() on it would block forever
    # a still image saved as .mp4, and an MP4 cut off before its index (written last)
    ffmpeg.run(["-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720", "-frames:v", "1",
                str(d / "image.png")], 60)  # fmt: skip
    (d / "image.png").rename(d / "image.mp4")
    ffmpeg.run(["-y", "-i", str(good), "-c", "copy", str(d / "tail.mp4")], 60)  # moov at the end
    tail = (d / "tail.mp4").read_bytes()
    (d / "no_index.mp4").write_bytes(tail[: len(tail) * 2 // 3])
    (d / "tail.mp4").unlink()
    # shell metacharacters in a name: a shell anywhere in the path would create MARK files
    (d / f"$(touch {MARK}); touch {MARK}.mp4").write_bytes(data)
    return d


@pytest.fixture(scope="module")
def servers(corpus):
    internal = Server({"/secret.mp4": ((corpus / "good.mp4").read_bytes(), "video/mp4")})
    good = (corpus / "good.mp4").read_bytes()
    public = Server({
        "/good.mp4": (good, "video/mp4"),
        "/error.mp4": ((corpus / "page.mp4").read_bytes(), "text/html"),
        "/lying.mp4": _lying_length(good[:200_000]),
        "/stall.mp4": _stall,
        "/to-file.mp4": _redirect("file:///etc/passwd"),
        "/to-internal.mp4": _redirect(f"http://localhost:{internal.port}/secret.mp4"),
    })  # fmt: skip
    yield public, internal
    public.close()
    internal.close()


def test_hostile_corpus(corpus, servers, ray_local, tmp_path, monkeypatch):
    from hdvg.runner import curate

    public, internal = servers
    # an HLS playlist disguised by extension, pointing at the internal server and a local file
    playlist = corpus / "playlist.m3u8"
    playlist.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
        f"http://127.0.0.1:{internal.port}/secret.mp4\n#EXT-X-ENDLIST\n"
    )
    local = {
        "good.mp4": ("downloaded", None),
        "zero.mp4": ("failed", "empty"),
        "truncated.mp4": ("failed", "truncated"),
        "random.mp4": ("failed", "not_video"),
        "page.mp4": ("failed", "not_video"),
        "audio_only.mp4": ("failed", "not_video"),
        "one_frame.mp4": ("failed", "no_scenes"),
        "image.mp4": ("failed", "not_video"),
        "no_index.mp4": ("failed", "truncated"),
        "huge.mp4": ("failed", "bad_header"),
        "bomb.mp4": ("failed", "timeout"),
        "fifo.mp4": ("failed", "not_a_file"),
        "playlist.m3u8": ("failed", "not_video"),
        f"$(touch {MARK}); touch {MARK}.mp4": ("downloaded", None),
    }
    expect = {str(corpus / k): v for k, v in local.items()}
    expect.update({
        str(corpus / "missing.mp4"): ("failed", "not_found"),
        "../" * 12 + "etc/passwd": ("failed", "not_video"),  # readable, but not a video
        f"{public.url}/good.mp4": ("downloaded", None),
        f"{public.url}/error.mp4": ("failed", "not_video"),
        f"{public.url}/nope.mp4": ("failed", "not_found"),  # HTTP 404
        f"{public.url}/lying.mp4": ("failed", "network_error"),
        f"{public.url}/stall.mp4": ("failed", "timeout"),
        f"{public.url}/to-file.mp4": ("failed", "scheme_not_allowed"),
        f"{public.url}/to-internal.mp4": ("failed", "host_not_allowed"),
        f"http://localhost:{internal.port}/secret.mp4": ("failed", "host_not_allowed"),
        f"ftp://127.0.0.1:{internal.port}/secret.mp4": ("failed", "scheme_not_allowed"),
        # separators and dot-dot in the URL path: downloads are named by source id
        f"{public.url}/..%2F..%2F..%2F{MARK}.mp4": ("downloaded", None),
        f"{public.url}/a/%2e%2e/%2e%2e/{MARK}.mp4": ("downloaded", None),
    })  # fmt: skip
    listing = tmp_path / "list" / "sources.txt"
    listing.parent.mkdir()
    listing.write_text("".join(f"{u}\n" for u in expect))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # relative writes would land here
    before = _snapshot(corpus), _snapshot(listing.parent)
    tmp_before = set(os.listdir("/tmp"))

    cfg = load_pipeline(ROOT / "pipelines" / "smoke.yaml", {
        "download": {"allow_private_hosts": True, "allowed_hosts": ["127.0.0.1"],
                     "retries": 0, "read_timeout_s": 2.0, "connect_timeout_s": 2.0},
        "probe": {"timeout_s": 3.0},
        "scenes": {"timeout_s": 4.0, "stall_s": 3.0},
        "ray": {"stall_timeout_s": 120.0},
    })  # fmt: skip
    out = tmp_path / "out"
    summary = curate(cfg, str(listing), out, quiet=True)

    rows = {r["source_url"]: r for r in pq.read_table(out / "manifest" / "sources").to_pylist()}
    got = {u: (rows[u]["status"], rows[u]["reason"]) for u in expect}
    assert got == expect
    for u, (status, reason) in expect.items():
        assert reason is None or reason in REASONS, reason
        if status == "failed":
            assert rows[u]["error"], u  # a human-readable cause beside the code
    assert summary["counts"]["sources"] == len(expect)
    clips = pq.read_table(out / "manifest" / "clips").to_pylist()
    assert {c["source_url"] for c in clips if c["status"] == "accepted"} == {
        u for u, (s, _) in expect.items() if s == "downloaded"
    }
    # nothing outside OUT: inputs untouched, cwd empty, no marked file anywhere, no new /tmp
    # entry of ours, and the forbidden hosts were never asked for anything
    assert (_snapshot(corpus), _snapshot(listing.parent)) == before
    assert list(cwd.iterdir()) == []
    assert _marked(tmp_path, corpus) == []
    assert not [n for n in set(os.listdir("/tmp")) - tmp_before if "hdvg" in n or MARK in n]
    assert internal.hits == []
    assert not list((out / ".work" / "downloads").glob("*"))  # temporary downloads removed
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())


def test_loopback_refused_by_default(servers, tmp_path):
    """With the default config a loopback URL is refused before any request is made."""
    public, _ = servers
    n = len(public.hits)
    with pytest.raises(DownloadError) as e:
        fetch(f"{public.url}/good.mp4", tmp_path / "x.bin", DownloadConfig())
    assert e.value.reason == "host_not_allowed"
    assert len(public.hits) == n
    assert not list(tmp_path.iterdir())
