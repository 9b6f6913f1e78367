"""`hdvg report OUT` on a real curated output: the page holds its plots and thumbnails
inline, and headless Chromium renders it without errors (DevTools protocol over a pipe)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hdvg.cli import main
from hdvg.manifest.query import query


@pytest.fixture(scope="module")
def reported(curated, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    shutil.copytree(curated, out)  # the report is written into OUT: keep the shared one clean
    assert main(["report", str(out)]) == 0
    return out


def _n(out, sql):
    return query(out, sql)[1][0][0]


def test_report_page_is_self_contained(reported):
    page = (reported / "report.html").read_text()
    accepted = _n(reported, "SELECT count(*) FROM clips WHERE status = 'accepted'")
    plots = re.findall(r'<img class="plot" id="plot-([\w-]+)"', page)
    assert {"funnel", "drops", "duration", "resolution", "aspect", "caption-length"} <= set(plots)
    scores = [c for c in query(reported, "DESCRIBE clips")[1] if c[0] == "short_side"]
    assert scores and "score-short_side" in plots
    thumbs = re.findall(
        r'<img class="thumb" alt="(\w+)" src="data:image/jpeg;base64,([^"]+)"', page
    )
    assert len(thumbs) == min(accepted, 24) > 0
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(thumbs[0][1])))
    assert img.width == 320 and len(img.getcolors(1 << 16) or range(1 << 16)) > 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external URLs
    assert "<script" not in page


def test_dataset_card(reported):
    card = (reported / "DATASET_CARD.md").read_text()
    accepted = _n(reported, "SELECT count(*) FROM clips WHERE status = 'accepted'")
    sources = _n(reported, "SELECT count(*) FROM sources")
    assert card.startswith("# Dataset card: smoke")
    assert f"| clips accepted | {accepted} |" in card and f"| sources | {sources} |" in card
    assert "clip `resolution`" in card and "source `not_video`" in card
    assert '"min_short_side": 720' in card and "### filters" in card


# --- a minimal DevTools-protocol client over --remote-debugging-pipe ----------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def _high(fd: int) -> int:
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """Chromium reads commands from its fd 3 and writes replies/events to fd 4, each a
    JSON message ended by NUL (no port, no websocket library)."""

    def __init__(self, exe: str, profile: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # move the child's ends above 9 so the shell's `3<&N 4>&M` cannot clobber them
        to_chrome_r, from_chrome_w = (_high(fd) for fd in (to_chrome_r, from_chrome_w))
        self.log = profile.with_suffix(".stderr")
        self._ids = 0
        self._buf = b""
        self.events: list[dict] = []
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--hide-scrollbars",
                f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]  # fmt: skip
        # a tiny launcher puts our pipe ends on fds 3 and 4 (no preexec_fn: Ray threads are
        # alive in this process; dash cannot redirect fds above 9)
        launch = (
            "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); "
            "os.dup2(w, 4); os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launch, str(to_chrome_r), str(from_chrome_w), *args],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError(f"chromium closed its pipe: {self.log.read_text()[-2000:]}")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:  # fmt: skip
        self._ids += 1
        msg = {"id": self._ids, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._ids:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._recv(deadline)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _errors(events: list[dict]) -> list[str]:
    errs = []
    for m in events:
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            errs.append(json.dumps(p.get("exceptionDetails", {}))[:500])
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errs.append(json.dumps(p.get("args", []))[:500])
        elif m.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errs.append(p["entry"].get("text", "")[:500])
    return errs


DOM_PROBE = """JSON.stringify({
  plots: [...document.querySelectorAll('img.plot')].map(i => [i.id, i.complete && i.naturalWidth > 0]),
  thumbs: [...document.querySelectorAll('img.thumb')].map(i => i.complete && i.naturalWidth > 0),
  title: document.title,
  height: document.documentElement.scrollHeight,
})"""


@pytest.mark.browser
def test_report_renders_in_headless_chromium(reported, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it when run as root)")
    accepted = _n(reported, "SELECT count(*) FROM clips WHERE status = 'accepted'")
    b = Browser(exe, tmp_path / "profile")
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            b.send(f"{domain}.enable", session=sid)
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False},
               session=sid)  # fmt: skip
        nav = b.send("Page.navigate", {"url": (reported / "report.html").as_uri()}, session=sid)
        assert "errorText" not in nav, nav
        b.wait_event("Page.loadEventFired")
        dom = json.loads(
            b.send(
                "Runtime.evaluate", {"expression": DOM_PROBE, "returnByValue": True}, session=sid
            )["result"]["value"]  # fmt: skip
        )
        full = {"x": 0, "y": 0, "width": 1280, "height": dom["height"], "scale": 1}
        shot = base64.b64decode(
            b.send(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True, "clip": full},
                session=sid,
            )["data"]  # fmt: skip
        )
    finally:
        b.close()
    png = tmp_path / "report.png"
    png.write_bytes(shot)
    if os.environ.get("HDVG_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["HDVG_KEEP_SCREENSHOT"])
    assert not _errors(b.events), _errors(b.events)
    assert dom["title"].startswith("smoke")
    assert len(dom["plots"]) >= 8 and all(ok for _, ok in dom["plots"]), dom["plots"]
    assert len(dom["thumbs"]) == min(accepted, 24) and all(dom["thumbs"])
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1280, dom["height"]) and dom["height"] > 2000
    colors = img.getcolors(1 << 20)
    assert colors is not None and len(colors) > 100  # not a blank page
    white = max(colors)[0] / (img.width * img.height)
    assert white < 0.95
