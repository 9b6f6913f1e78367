"""A real multi-node Ray cluster on loopback (`ray start --head` + a second `ray start`,
one CPU each) running `hdvg curate --ray-address` and `ray job submit -- hdvg curate`, with
faults: a worker SIGKILLed mid-job, the driver SIGKILLed mid-job then rerun (resume), and
`--retry-failed`. Every run is compared with an uninterrupted serial run: same clip keys,
same sha256, each exactly once in the manifest and in the shards.

A process joins one Ray cluster only, so the drivers run as `hdvg curate` subprocesses. The
cluster is torn down by killing only its own processes (found by its temp dirs and port),
never with `ray stop`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from hdvg import media
from hdvg.config import load_pipeline
from hdvg.media import VideoSpec

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "pipelines" / "smoke.yaml"
RUN_TIMEOUT_S = 240
N_SOURCES = 6


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """Head + one worker node on 127.0.0.1, each with its own temp dir and ports."""

    def __init__(self):
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        self.temps = [Path(tempfile.mkdtemp(prefix="hdvgray", dir="/tmp")) for _ in range(2)]
        (self.gcs, self.dash, *p) = _free_ports(12)
        self.address = f"127.0.0.1:{self.gcs}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                  "--object-store-memory=200000000"]  # fmt: skip
        head = ["ray", "start", "--head", f"--port={self.gcs}", f"--temp-dir={self.temps[0]}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash}", f"--ray-client-server-port={p[0]}",
                f"--dashboard-agent-listen-port={p[1]}", f"--dashboard-agent-grpc-port={p[2]}",
                f"--metrics-export-port={p[3]}", f"--runtime-env-agent-port={p[4]}", *common]  # fmt: skip
        node = ["ray", "start", f"--address={self.address}", f"--temp-dir={self.temps[1]}",
                f"--dashboard-agent-listen-port={p[5]}", f"--dashboard-agent-grpc-port={p[6]}",
                f"--metrics-export-port={p[7]}", f"--runtime-env-agent-port={p[8]}", *common]  # fmt: skip
        try:
            for cmd in (head, node):
                subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=120)
            self._wait_nodes(2)
        except BaseException:
            self.stop()
            raise

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(self.raylets()) >= n:
                return
            time.sleep(0.5)
        raise RuntimeError("cluster nodes did not come up")

    def _own(self) -> list[psutil.Process]:
        keys = [str(t) for t in self.temps] + [f":{self.gcs} ", f":{self.gcs}\x00"]
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = "\x00".join(proc.info["cmdline"] or []) + "\x00"
            if any(k in cmd or k.replace(" ", "\x00") in cmd for k in keys):
                found.append(proc)
        return found

    def raylets(self) -> list[psutil.Process]:
        return [p for p in self._own() if p.name() == "raylet"]

    def source_workers(self) -> list[tuple[psutil.Process, int]]:
        """(worker running `_source_fn`, its raylet's pid) across both nodes."""
        out = []
        for raylet in self.raylets():
            for child in raylet.children(recursive=True):
                try:
                    if "_source_fn" in " ".join(child.cmdline()):
                        out.append((child, raylet.pid))
                except psutil.NoSuchProcess:
                    pass
        return out

    def curate(
        self, *args: str, wait: bool = True
    ) -> subprocess.Popen | subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hdvg", "curate", str(SMOKE), "--ray-address", self.address,
               *args]  # fmt: skip
        if not wait:
            return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)  # fmt: skip

    def stop(self) -> None:
        procs = self._own()
        for p in list(procs):
            try:
                procs += p.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        for t in self.temps:
            shutil.rmtree(t, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cluster_src")
    for i in range(N_SOURCES):
        segs = (2.2 + 0.1 * i, 2.4) if i % 2 else (2.6 + 0.1 * i,)
        media.make_video(d / f"src{i:02d}.mp4", VideoSpec(1280, 720, 25, segs))
    return d


def _reference(src: Path, out: Path, overrides: dict | None = None) -> dict[str, str]:
    from hdvg.runner import curate

    cfg = load_pipeline(SMOKE, {"ray": {"executor": "serial"}, **(overrides or {})})
    curate(cfg, str(src), out, quiet=True)
    return _contents(out)


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> dict[str, str]:
    """clip key -> sha256 of an uninterrupted run (serial executor, no Ray)."""
    return _reference(sources, tmp_path_factory.mktemp("ref") / "out")


def _contents(out: Path) -> dict[str, str]:
    """Checks OUT is whole (no temp files, every source and clip once, shards == manifest)
    and returns {accepted clip key: sha256}."""
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    srcs = pq.read_table(out / "manifest" / "sources").column("source_id").to_pylist()
    assert len(srcs) == len(set(srcs)), "a source has two rows"
    clips = pq.read_table(out / "manifest" / "clips").to_pylist()
    ids = [c["clip_id"] for c in clips]
    assert len(ids) == len(set(ids)), "a clip has two rows"
    accepted = {c["clip_id"]: c["sha256"] for c in clips if c["status"] == "accepted"}
    in_shards: dict[str, str] = {}
    for shard in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".mp4"):
                    key = m.name[: -len(".mp4")]
                    assert key not in in_shards, f"{key} twice in the shards"
                    in_shards[key] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                    assert {c["clip_id"]: c["shard"] for c in clips}[key] == shard.name
    assert in_shards == accepted
    return accepted


def test_cluster_run_survives_worker_kill(cluster, sources, reference, tmp_path):
    """`hdvg curate --ray-address` on two nodes; one `_source_fn` worker SIGKILLed mid-task."""
    out = tmp_path / "out"
    proc = cluster.curate("--input", str(sources), "--output", str(out), wait=False)
    killed, nodes = None, set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        workers = cluster.source_workers()
        nodes.update(raylet for _, raylet in workers)
        if workers and killed is None:
            killed = workers[0][0]
            killed.send_signal(signal.SIGKILL)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert killed is not None, "no worker was seen running a source"
    assert not killed.is_running()
    assert len(nodes) == 2, "sources ran on one node only"
    assert _contents(out) == reference
    assert len(reference) >= N_SOURCES


def test_driver_kill_then_resume(cluster, sources, reference, tmp_path):
    """SIGKILL the driver after its first commit; the rerun skips the committed sources and
    the result holds the same clips (keys, sha256) as an uninterrupted run."""
    out = tmp_path / "out"
    args = ("--input", str(sources), "--output", str(out), "--set", "shards.max_samples=2")
    proc = cluster.curate(*args, wait=False)
    parts = out / "manifest" / "sources"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if parts.exists() and list(parts.glob("part-*.parquet")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    done_before = len(pq.read_table(parts).column("source_id"))
    assert 0 < done_before < N_SOURCES
    rerun = cluster.curate(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done_before} already done, {N_SOURCES - done_before} to process" in rerun.stderr
    assert _contents(out) == reference


def test_retry_failed_reattempts_only_failed(cluster, sources, reference, tmp_path):
    listing = tmp_path / "sources.txt"
    late = tmp_path / "late.mp4"  # missing on the first run: a failed source
    names = sorted(sources.glob("*.mp4"))[:3]
    listing.write_text("".join(f"{p}\n" for p in [*names, late]))
    out = tmp_path / "out"
    first = cluster.curate("--input", str(listing), "--output", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    rows = pq.read_table(out / "manifest" / "sources").to_pylist()
    assert {r["source_url"]: r["reason"] for r in rows if r["status"] == "failed"} == {
        str(late): "not_found"
    }
    shards_before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    shutil.copy(names[0], late)
    retry = cluster.curate("--input", str(listing), "--output", str(out), "--retry-failed")
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "3 already done, 1 to process" in retry.stderr  # only the failed one
    rows = pq.read_table(out / "manifest" / "sources").to_pylist()
    assert sorted(r["status"] for r in rows) == ["downloaded"] * 4
    # the late source is a copy of the first: same cuts, same bytes, under its own keys
    want = {k: v for k, v in reference.items() if k[:16] in {_sid(p) for p in names}}
    want.update({k.replace(_sid(names[0]), _sid(late)): v for k, v in want.items()
                 if k.startswith(_sid(names[0]))})  # fmt: skip
    assert _contents(out) == want
    for name, mtime in shards_before.items():  # committed shards were not rewritten
        assert (out / "shards" / name).stat().st_mtime_ns == mtime


def _sid(path: Path) -> str:
    from hdvg.records import source_id_for

    return source_id_for(str(path))


def test_ray_job_submit(cluster, sources, reference, tmp_path):
    """`ray job submit -- hdvg curate ...`: the driver runs on the head, RAY_ADDRESS set."""
    out = tmp_path / "out"
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard, "--", "hdvg", "curate",
           str(SMOKE), "--input", str(sources), "--output", str(out), "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "succeeded" in run.stdout + run.stderr
    assert _contents(out) == reference
    import json

    assert json.loads((out / "run.json").read_text())["ray_address"] != "local"
