"""A small, hostile-on-request HTTP server on 127.0.0.1 for download tests.

Serves files from a folder (with single byte-range support, so ffmpeg and yt-dlp can
seek) and any number of scripted routes: arbitrary status codes and reason phrases,
redirects (to other paths, other hosts, `file://`), lying Content-Length, slow or hanging
responses, HTML pages. Everything is bounded: every sleep is capped and wakes up when the
server stops, and the server stops itself after `lifetime_s` even if a test forgets.

    with LocalServer(media_dir) as srv:
        srv.route("/gone", Route(status=410))
        srv.redirect("/r", "file:///etc/passwd")
        fetch(srv.url("/gone"), ...)
        srv.url("/files/hd720.mp4")     # a file from media_dir
        srv.hits("/gone")               # how often it was requested

Only ever binds 127.0.0.1; `url(..., host="localhost")` gives a second host name for
cross-host redirect tests.
"""

from __future__ import annotations

import mimetypes
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_SLEEP_S = 30.0  # no single scripted delay is longer than this


@dataclass
class Route:
    status: int = 200
    body: bytes | str = b""
    content_type: str | None = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # status line reason phrase (yt-dlp prints it in its errors)
    content_length: int | None = None  # declared length; None: the true length; -1: none sent
    delay_s: float = 0.0  # before the status line
    hang_s: float = 0.0  # after the headers, before the body
    drip_s: float = 0.0  # pause between body chunks of `drip_bytes`
    drip_bytes: int = 1024
    file: Path | None = None  # serve this file as the body (with Range support)
    times: int | None = None  # answer like this only the first N times, then `then`
    then: Route | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # clients that hang up (timeouts, size caps, killed yt-dlp) are the point of the tests
        pass


class LocalServer:
    def __init__(self, root: str | Path | None = None, *, lifetime_s: float = 120.0):
        self.root = Path(root).resolve() if root else None
        self.lifetime_s = lifetime_s
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.started: list[tuple[float, str]] = []  # (monotonic time, path) per request
        self.in_flight = 0
        self.max_in_flight = 0  # most requests served at once (for concurrency limits)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None

    # -- scripting -------------------------------------------------------------------
    def route(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        return self.route(path, Route(status=status, headers={"Location": to}, content_type=None))

    def html(self, path: str, text: str, status: int = 200) -> str:
        return self.route(
            path, Route(status=status, body=text, content_type="text/html; charset=utf-8")
        )

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def file_url(self, name: str) -> str:
        return self.url(f"/files/{name}")

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for _m, p, _h in self.log if p == path)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> LocalServer:
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()  # fmt: skip
        timer = threading.Timer(self.lifetime_s, self.stop)
        timer.daemon = True
        timer.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()  # wakes every sleeping handler
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def sleep(self, seconds: float) -> bool:
        """Bounded sleep; False when the server is stopping (the handler should give up)."""
        return not self._stop.wait(min(max(seconds, 0.0), MAX_SLEEP_S))


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def _make_handler(server: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._handle(head=True)

        def do_GET(self) -> None:
            self._handle(head=False)

        def _pick(self, path: str) -> Route | None:
            with server._lock:
                route = server.routes.get(path)
                if route is not None and route.times is not None:
                    if route.times <= 0:
                        return route.then
                    route.times -= 1
            if route is None and server.root and path.startswith("/files/"):
                f = (server.root / path[len("/files/") :]).resolve()
                if f.is_file() and server.root in f.parents:
                    ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                    route = Route(file=f, content_type=ctype)
            return route

        def _handle(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            with server._lock:
                server.log.append((self.command, path, dict(self.headers)))
                server.started.append((time.monotonic(), path))
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._respond(path, head)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _respond(self, path: str, head: bool) -> None:
            route = self._pick(path)
            if route is None:
                route = Route(status=404, body="<html><body>Not Found</body></html>",
                              content_type="text/html")  # fmt: skip
            if route.delay_s and not server.sleep(route.delay_s):
                return
            status, body = route.status, route.body
            headers = dict(route.headers)
            if route.file is not None:
                body, status, extra = self._file_body(route.file)
                headers.update(extra)
            if isinstance(body, str):
                body = body.encode()
            self.send_response(status, route.reason)
            if route.content_type:
                self.send_header("Content-Type", route.content_type)
            length = len(body) if route.content_length is None else route.content_length
            if length >= 0:
                self.send_header("Content-Length", str(length))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            try:
                self.wfile.flush()
                if route.hang_s and not server.sleep(route.hang_s):
                    return
                step = route.drip_bytes if route.drip_s else len(body) or 1
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    if route.drip_s and not server.sleep(route.drip_s):
                        return
            except (BrokenPipeError, ConnectionResetError):
                return
            if route.content_length is not None and route.content_length != len(body):
                self.close_connection = True  # a liar hangs up; the client sees a short body

        def _file_body(self, f: Path) -> tuple[bytes, int, dict[str, str]]:
            data = f.read_bytes()
            extra = {"Accept-Ranges": "bytes"}
            m = _RANGE.match(self.headers.get("Range", "").strip())
            if not m or (not m.group(1) and not m.group(2)):
                return data, 200, extra
            n = len(data)
            if m.group(1):
                a = int(m.group(1))
                b = int(m.group(2)) if m.group(2) else n - 1
            else:  # suffix range: the last N bytes
                a, b = max(0, n - int(m.group(2))), n - 1
            if a >= n:
                return b"", 416, {"Content-Range": f"bytes */{n}"}
            b = min(b, n - 1)
            extra["Content-Range"] = f"bytes {a}-{b}/{n}"
            return data[a : b + 1], 206, extra

    return Handler


def wait_until(pred, timeout_s: float = 10.0, step_s: float = 0.05) -> bool:
    """Poll `pred` until true or the timeout (bounded waits in tests)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step_s)
    return bool(pred())
