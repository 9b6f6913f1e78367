"""The Docker / compose / KubeRay files cannot be built or run here (no Docker engine, no
Kubernetes): check that they parse, that every command they run is a valid `hdvg` or
`ray start` command line, and that the files they copy and the recipes they name exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from hdvg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _hdvg_args(command: str) -> list[str]:
    argv = shlex.split(re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", command))  # compose defaults
    assert argv[0] == "hdvg", argv
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on a bad command
    pipeline = Path(args.pipeline)
    assert pipeline.parts[:2] == ("/", "app") and (ROOT / pipeline.relative_to("/app")).is_file()
    return argv


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name):
    text = (DOCKER / name).read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 1
    for src in re.findall(r"^COPY (.+) \./\S*$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"{name} copies missing {path}"
    assert "ray[default]" in text  # the job server, for `ray job submit` and RayJobs
    assert "imageio_ffmpeg" in text and "hdvg --version" in text
    extras = {"Dockerfile": '".[yt]"', "Dockerfile.cuda": '".[models,t2v,yt]"'}[name]
    assert f"pip install {extras}" in text
    if name.endswith("cuda"):
        assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)
    assert (DOCKER / f"{name}.dockerignore").is_file()


def test_compose_starts_head_workers_and_job():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = spec["services"]
    assert set(svc) == {"ray-head", "ray-worker", "curate"}
    head = shlex.split(svc["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head and "--port=6379" in head
    worker = shlex.split(svc["ray-worker"]["command"])
    assert worker[:3] == ["ray", "start", "--address=ray-head:6379"] and "--block" in worker
    argv = _hdvg_args(svc["curate"]["command"])
    assert argv[argv.index("--ray-address") + 1] == "ray-head:6379"
    for s in svc.values():
        assert any(v.endswith(":/data") for v in s["volumes"])  # sources and OUT shared


def test_rayjob_runs_hdvg_curate():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _hdvg_args(spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {"hdvg:cpu", "hdvg:cuda"}
    gpu = [g for g in groups if g["groupName"] == "gpu"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in [head] + [g["template"]["spec"] for g in groups]:
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/data" in mounts


def test_rayjob_train_runs_hdvg_train_on_every_gpu():
    """docker/rayjob-train.yaml: its entrypoint is a valid `hdvg train` on Ray Train that a
    resubmitted driver can rerun (--resume), with as many ranks as the GPU group has GPUs,
    and CPUs for each rank and its loader workers (the default --ray-cpus-per-worker)."""
    job = yaml.safe_load((DOCKER / "rayjob-train.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["hdvg", "train"]
    args = build_parser().parse_args(argv[1:])  # exits (fails the test) on a bad command
    config = Path(args.config)
    assert config.parts[:2] == ("/", "app") and (ROOT / config.relative_to("/app")).is_file()
    assert args.resume and args.ray_address == "auto" and args.ray_max_failures > 0
    assert args.ray_gpus_per_worker is None and args.ray_cpus_per_worker is None  # defaults
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    (box,) = gpu["template"]["spec"]["containers"]
    assert box["image"] == "hdvg:cuda"
    per_node = int(box["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu["replicas"] == gpu["minReplicas"] and per_node * gpu["replicas"] == args.ray_workers
    loaders = yaml.safe_load((ROOT / "pipelines" / "t2v-base.yaml").read_text())["data"]
    assert int(box["resources"]["requests"]["cpu"]) >= per_node * (1 + loaders["num_workers"])
    mounts = {m["mountPath"] for m in box["volumeMounts"]}
    assert {"/data", "/dev/shm"} <= mounts  # the shared run dir; the loaders' shared memory
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/data" in {m["mountPath"] for m in head["volumeMounts"]}
