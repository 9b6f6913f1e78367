"""Plain http(s) downloads against a real loopback server: status codes → reasons, size
caps, content sniffing, redirects limited to allowed schemes and hosts, retries, timeouts."""

from __future__ import annotations

import dataclasses
import time

import pytest

from hdvg.config import DownloadConfig
from hdvg.download import DownloadError, classify_text, fetch, fetch_task, needed_section
from hdvg.records import REASONS, GivenScene, SourceTask
from tests.httpserver import LocalServer, Route

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64  # bytes shaped like an mp4


def _cfg(**kw) -> DownloadConfig:
    base = dict(allow_private_hosts=True, allowed_hosts=["127.0.0.1"], retries=2,
                backoff_s=0.01, connect_timeout_s=2.0, read_timeout_s=2.0)  # fmt: skip
    base.update(kw)
    return DownloadConfig(**base)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "v.mp4").write_bytes(VIDEO)
    with LocalServer(root, lifetime_s=170) as s:
        yield s


def _reason(url: str, tmp_path, **kw) -> str:
    with pytest.raises(DownloadError) as e:
        fetch(url, tmp_path / "d.bin", _cfg(**kw))
    assert e.value.reason in REASONS, e.value.reason
    assert not (tmp_path / "d.part").exists()  # no half file left behind
    return e.value.reason


def test_file_served(srv, tmp_path):
    got = fetch(srv.file_url("v.mp4"), tmp_path / "d.bin", _cfg())
    assert got.path.read_bytes() == VIDEO and got.size_bytes == len(VIDEO) and got.temporary


@pytest.mark.parametrize("status,reason", [
    (401, "login_required"), (403, "forbidden"), (404, "not_found"), (410, "removed"),
    (451, "geo_blocked"), (400, "http_error"),
])  # fmt: skip
def test_status_codes(srv, tmp_path, status, reason):
    url = srv.route(f"/s{status}", Route(status=status, body="no", content_type="text/plain"))
    assert _reason(url, tmp_path) == reason
    assert srv.hits(f"/s{status}") == 1  # client errors are not retried


def test_rate_limited_retries_then_fails(srv, tmp_path):
    srv.route("/429", Route(status=429, headers={"Retry-After": "0"}))
    assert _reason(srv.url("/429"), tmp_path, retries=2) == "rate_limited"
    assert srv.hits("/429") == 3


def test_5xx_retried_then_succeeds(srv, tmp_path):
    srv.route("/flaky", Route(status=503, times=2, then=Route(body=VIDEO)))
    got = fetch(srv.url("/flaky"), tmp_path / "d.bin", _cfg(retries=3))
    assert got.size_bytes == len(VIDEO) and srv.hits("/flaky") == 3


def test_html_is_not_a_video(srv, tmp_path):
    srv.html("/page", "<html><body><h1>Welcome</h1> nothing to see</body></html>")
    assert _reason(srv.url("/page"), tmp_path) == "not_video"
    # served as video/mp4, but it is HTML: sniffed from the first bytes
    srv.route("/fake.mp4", Route(body="<!DOCTYPE html><html>hi</html>", content_type="video/mp4"))
    assert _reason(srv.url("/fake.mp4"), tmp_path) == "not_video"


@pytest.mark.parametrize("text,reason", [
    ("Sign in to confirm you're not a bot. This helps protect our community.", "bot_check"),
    ("Please sign in to view this video", "login_required"),
    ("This video is private", "private"),
])  # fmt: skip
def test_html_page_text_classified(srv, tmp_path, text, reason):
    srv.html(f"/t-{reason}", f"<html><body><p>{text}</p></body></html>")
    assert _reason(srv.url(f"/t-{reason}"), tmp_path) == reason


def test_redirects(srv, tmp_path):
    srv.redirect("/ok", "/files/v.mp4")
    assert fetch(srv.url("/ok"), tmp_path / "d.bin", _cfg()).size_bytes == len(VIDEO)
    srv.redirect("/to-file", "file:///etc/passwd")
    assert _reason(srv.url("/to-file"), tmp_path) == "scheme_not_allowed"
    srv.redirect("/to-ftp", "ftp://127.0.0.1/x.mp4")
    assert _reason(srv.url("/to-ftp"), tmp_path) == "scheme_not_allowed"
    srv.redirect("/to-other-host", srv.file_url("v.mp4").replace("127.0.0.1", "localhost"))
    assert _reason(srv.url("/to-other-host"), tmp_path) == "host_not_allowed"
    srv.redirect("/loop", "/loop")
    assert _reason(srv.url("/loop"), tmp_path, max_redirects=3) == "http_error"
    assert srv.hits("/loop") == 4


def test_loopback_refused_by_default(srv, tmp_path):
    with pytest.raises(DownloadError) as e:
        fetch(srv.file_url("v.mp4"), tmp_path / "d.bin", DownloadConfig())
    assert e.value.reason == "host_not_allowed"
    with pytest.raises(DownloadError) as e:  # cloud metadata address
        fetch("http://169.254.169.254/latest/meta-data/", tmp_path / "d.bin", DownloadConfig())
    assert e.value.reason == "host_not_allowed"


def test_private_hosts_allowed_still_refuse_cloud_metadata(srv, tmp_path):
    """`allow_private_hosts` opens loopback and private ranges (an internal object store),
    not link-local ones: a redirect to 169.254.169.254 (cloud credentials) is refused before
    any connection, unless `allowed_hosts` names that address itself."""
    from hdvg.download import check_host

    private = DownloadConfig(allow_private_hosts=True)
    assert fetch(srv.file_url("v.mp4"), tmp_path / "d.bin", private).size_bytes == len(VIDEO)
    srv.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
    with pytest.raises(DownloadError, match="link-local") as e:
        fetch(srv.url("/to-metadata"), tmp_path / "d.bin", private)
    assert e.value.reason == "host_not_allowed"
    for host in ("169.254.169.254", "fe80::1"):
        with pytest.raises(DownloadError, match="link-local"):
            check_host(host, private)
    check_host("169.254.169.254", DownloadConfig(allow_private_hosts=True,
                                                 allowed_hosts=["169.254.169.254"]))  # fmt: skip


def test_size_caps_and_lying_length(srv, tmp_path):
    srv.route("/big", Route(body=VIDEO))
    assert _reason(srv.url("/big"), tmp_path, max_bytes=1000) == "too_large"  # declared
    srv.route("/big-undeclared", Route(body=VIDEO, content_length=-1))
    assert _reason(srv.url("/big-undeclared"), tmp_path, max_bytes=1000) == "too_large"
    srv.route("/liar", Route(body=VIDEO, content_length=len(VIDEO) * 2))
    assert _reason(srv.url("/liar"), tmp_path, retries=0) == "network_error"
    srv.route("/empty", Route(body=b""))
    assert _reason(srv.url("/empty"), tmp_path) == "empty"


def test_hanging_and_dripping(srv, tmp_path):
    srv.route("/hang", Route(body=VIDEO, hang_s=10))
    t0 = time.monotonic()
    assert _reason(srv.url("/hang"), tmp_path, retries=0, read_timeout_s=0.5) == "timeout"
    srv.route("/slow-headers", Route(body=VIDEO, delay_s=10))
    assert _reason(srv.url("/slow-headers"), tmp_path, retries=0, read_timeout_s=0.5) == "timeout"
    # each read is quick, the whole is not: the total deadline stops it
    srv.route("/drip", Route(body=VIDEO, drip_s=0.2, drip_bytes=512))
    assert _reason(srv.url("/drip"), tmp_path, retries=0, total_timeout_s=1.0) == "timeout"
    assert time.monotonic() - t0 < 8


# yt-dlp's and YouTube's own words (see tests/test_ytdlp.py for the verbatim source check)
@pytest.mark.parametrize("text,reason", [
    ("ERROR: [youtube] abc: Sign in to confirm you’re not a bot. Use --cookies-from-browser"
     " or --cookies for the authentication.", "bot_check"),
    ("ERROR: [youtube] abc: Private video. Sign in if you've been granted access to this"
     " video. Use --cookies-from-browser or --cookies for the authentication.", "private"),
    ("ERROR: [youtube] abc: Video unavailable. This video has been removed by the uploader",
     "removed"),
    ("ERROR: [youtube] abc: Video unavailable. This video is no longer available due to a"
     " copyright claim by X", "removed"),
    ("ERROR: [youtube] abc: Video unavailable", "unavailable"),
    ("ERROR: [youtube] abc: The uploader has not made this video available in your country",
     "geo_blocked"),
    ("ERROR: [youtube] abc: Sign in to confirm your age. This video may be inappropriate for"
     " some users.", "login_required"),
    ("ERROR: [youtube] abc: Join this channel to get access to members-only content like this"
     " video, and other exclusive perks.", "login_required"),
    ("ERROR: [youtube] abc: This content isn't available, try again later. The current"
     " session has been rate-limited by YouTube for up to an hour.", "rate_limited"),
    ("ERROR: unable to download video data: HTTP Error 429: Too Many Requests", "rate_limited"),
    ("ERROR: [generic] Unable to download webpage: HTTP Error 404: Not Found", "unavailable"),
    ("ERROR: [generic] Unable to download webpage: HTTP Error 410: Gone", "removed"),
    ("ERROR: [generic] Unable to download webpage: HTTP Error 451: Unavailable For Legal"
     " Reasons", "geo_blocked"),
    ("ERROR: [generic] Unable to download webpage: HTTP Error 403: Forbidden", "forbidden"),
    ("ERROR: [generic] Unable to download webpage: The read operation timed out", "timeout"),
    ("ERROR: [youtube] abc: Requested format is not available. Use --list-formats for a list"
     " of available formats", "no_format"),
    ("ERROR: Unsupported URL: http://127.0.0.1:1/page", "not_video"),
])  # fmt: skip
def test_classify_text(text, reason):
    assert classify_text(text) == reason and reason in REASONS


def test_needed_section_and_shift(srv, tmp_path):
    scenes = [GivenScene(12.0, 15.0, "a.0_1"), GivenScene(10.0, 12.0, "a.0_0"),
              GivenScene(30.0, None, "a.1_0")]  # fmt: skip
    task = SourceTask(0, srv.file_url("v.mp4"), "s", given_scenes=scenes)
    assert needed_section(task) == (10.0, None)
    assert needed_section(dataclasses.replace(task, given_scenes=scenes[:2])) == (10.0, 15.0)
    assert needed_section(SourceTask(0, "x", "s", start_s=3.0)) == (3.0, None)
    assert needed_section(SourceTask(0, "x", "s")) is None
    fetched, same = fetch_task(task, tmp_path / "d.bin", _cfg())  # plain http: whole file
    assert fetched.offset_s == 0 and same is task
