"""Fetch a source to local disk: local paths in place; http(s) streamed with caps,
timeouts, retries and address checks at every redirect; any other fsspec URL copied.

Downloads are named by source id under OUT/.work/downloads, never by anything in the URL,
so a hostile name cannot write outside OUT.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .config import DownloadConfig

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Fetched:
    path: Path
    size_bytes: int
    sha256: str
    temporary: bool  # delete after processing


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def scheme_of(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    # a bare path (or a Windows drive letter) is a local file
    return "file" if len(parsed.scheme) <= 1 else parsed.scheme.lower()


def check_host(host: str | None, cfg: DownloadConfig) -> None:
    """Resolve `host` and refuse private, loopback, link-local (cloud metadata) and reserved
    addresses unless the config allows them."""
    if not host:
        raise DownloadError("host_not_allowed", "URL has no host")
    if cfg.allowed_hosts and host not in cfg.allowed_hosts:
        raise DownloadError("host_not_allowed", f"host {host} not in download.allowed_hosts")
    if cfg.allow_private_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise DownloadError("network_error", f"cannot resolve {host}: {e}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise DownloadError(
                "host_not_allowed",
                f"{host} resolves to non-public address {ip} (set download.allow_private_hosts)",
            )


def fetch(url: str, dest: Path, cfg: DownloadConfig) -> Fetched:
    scheme = scheme_of(url)
    if scheme not in cfg.allowed_schemes:
        raise DownloadError("scheme_not_allowed", f"scheme {scheme!r} not in download.allowed_schemes")
    if scheme == "file":
        path = Path(urllib.parse.urlparse(url).path if url.startswith("file:") else url)
        if not path.is_file():
            raise DownloadError("not_found", f"no such file: {path}")
        size = path.stat().st_size
        if size == 0:
            raise DownloadError("empty", "zero-byte file")
        return Fetched(path, size, _hash_file(path), temporary=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if scheme in ("http", "https"):
        return _fetch_http(url, dest, cfg)
    return _fetch_fsspec(url, dest, cfg)


def _fetch_fsspec(url: str, dest: Path, cfg: DownloadConfig) -> Fetched:
    import fsspec

    tmp = dest.with_suffix(".part")
    h = hashlib.sha256()
    size = 0
    try:
        with fsspec.open(url, "rb") as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
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


def _fetch_http(url: str, dest: Path, cfg: DownloadConfig) -> Fetched:
    import requests

    attempt = 0
    while True:
        try:
            return _http_once(url, dest, cfg, requests)
        except DownloadError as e:
            retryable = e.reason in ("timeout", "network_error") or getattr(e, "status", 0) >= 500
            if not retryable or attempt >= cfg.retries:
                raise
            time.sleep(cfg.backoff_s * (2**attempt))
            attempt += 1


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
            if resp.is_redirect or resp.status_code in (301, 302, 303, 307, 308):
                loc = resp.headers.get("Location")
                if not loc:
                    raise DownloadError("http_error", f"redirect {resp.status_code} without Location")
                current = urllib.parse.urljoin(current, loc)
                continue
            if resp.status_code != 200:
                err = DownloadError("http_error", f"HTTP {resp.status_code}")
                err.status = resp.status_code  # type: ignore[attr-defined]
                raise err
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
                raise DownloadError("too_large", f"Content-Length {declared} > {cfg.max_bytes}")
            h = hashlib.sha256()
            size = 0
            try:
                with open(tmp, "wb") as out:
                    for chunk in resp.iter_content(CHUNK):
                        size += len(chunk)
                        if size > cfg.max_bytes:
                            raise DownloadError("too_large", f"larger than {cfg.max_bytes} bytes")
                        h.update(chunk)
                        out.write(chunk)
            except DownloadError:
                tmp.unlink(missing_ok=True)
                raise
            except requests.exceptions.RequestException as e:
                tmp.unlink(missing_ok=True)
                reason = "timeout" if "timed out" in str(e).lower() else "network_error"
                raise DownloadError(reason, f"{type(e).__name__}: {e}") from None
            if declared and declared.isdigit() and int(declared) != size:
                tmp.unlink(missing_ok=True)
                raise DownloadError(
                    "network_error", f"got {size} bytes, Content-Length said {declared}"
                )
            if size == 0:
                tmp.unlink(missing_ok=True)
                raise DownloadError("empty", "zero-byte response")
            tmp.replace(dest)
            return Fetched(dest, size, h.hexdigest(), temporary=True)
    raise DownloadError("http_error", f"more than {cfg.max_redirects} redirects")
