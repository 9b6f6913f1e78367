"""Multi-process training on the CPU (gloo): torchrun and Ray Train, real shards, the shipped
tiny config. Each launch is a fresh interpreter per rank, so these are the slow t2v tests."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from hdvg.t2v.train import load_checkpoint
from tests.t2v.conftest import ROOT, make_shards

TINY = ROOT / "pipelines" / "t2v-tiny.yaml"  # batch 2, one DataLoader worker, fp32


def tiny_yaml(tmp: Path, **train) -> Path:
    """The shipped tiny config with `train` overrides."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["train"] |= train
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def shard_of_key(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            out |= {m.name.split(".")[0]: p.name for m in tf.getmembers()}
    return out


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> Path:
    """8 clips in 4 shards: 2 shards (4 clips, 2 steps of batch 2) per rank per epoch."""
    root = tmp_path_factory.mktemp("ddp")
    make_shards(root, 8, per_shard=2)
    return root


def torchrun(config: Path, shards: Path, run: Path, steps: int, resume: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "hdvg.t2v.cli", "train", str(config), "--shards", str(shards)]
    cmd += ["--output", str(run), "--steps", str(steps)] + (["--resume"] if resume else [])
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-8000:]
    return r.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_stream_and_resume(four_shards, tmp_path):
    config = tiny_yaml(tmp_path, ckpt_every=2)
    full = tmp_path / "full"
    log = torchrun(config, four_shards, full, 4)
    got = rows(full)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in got.values())

    # both ranks trained, on different clips: per step one batch from each rank, and over the
    # first epoch (steps 1-2) each rank read its own two whole shards
    assert all(len(r["keys"]) == 2 and all(len(k) == 2 for k in r["keys"]) for r in got.values())
    where = shard_of_key(four_shards)
    epoch0 = [{where[k] for s in (1, 2) for k in got[s]["keys"][rank]} for rank in (0, 1)]
    assert len(epoch0[0]) == len(epoch0[1]) == 2 and not epoch0[0] & epoch0[1], epoch0
    for r in got.values():
        assert not set(r["keys"][0]) & set(r["keys"][1]), r["keys"]

    # each checkpoint written once, by one rank, holding both ranks' stream and RNG states
    assert log.count("saved checkpoint") == 2
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["step-00000002.ckpt", "step-00000004.ckpt"]
    ckpt = load_checkpoint(full / "last.ckpt")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert [sorted(d["cursors"]) for d in ckpt["data"]] == [[0], [1]]  # worker 0 of rank 0, 1

    # killed after logging step 4 but before its checkpoint: resumed under torchrun from step
    # 2, it drops the lost rows and trains steps 3-4 again on the same clips, to the same losses
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, symlinks=True)
    (cut / "checkpoints" / "step-00000004.ckpt").unlink()
    (cut / "last.ckpt").unlink()
    (cut / "last.ckpt").symlink_to("checkpoints/step-00000002.ckpt")
    log = torchrun(config, four_shards, cut, 4, resume=True)
    assert log.count("resumed from") == 2  # each rank
    assert log.count("at step 2") == 2
    resumed = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r in resumed:
        assert (r["loss"], r["keys"]) == (got[r["step"]]["loss"], got[r["step"]]["keys"])
    assert os.readlink(cut / "last.ckpt") == "checkpoints/step-00000004.ckpt"
    again = load_checkpoint(cut / "last.ckpt")["model"]
    assert all(torch.equal(v, again[k]) for k, v in ckpt["model"].items())
