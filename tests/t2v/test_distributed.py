"""Multi-process training on the CPU (gloo): torchrun and Ray Train, real shards, the shipped
tiny config. Each launch is a fresh interpreter per rank, so these are the slow t2v tests."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from hdvg.t2v.train import load_checkpoint
from tests.t2v.conftest import ROOT, make_shards, training_run

TINY = ROOT / "pipelines" / "t2v-tiny.yaml"  # batch 2, one DataLoader worker, fp32


PROMPTS = ["a red car", "waves at dusk", "a dog running"]


def tiny_yaml(tmp: Path, sample: dict | None = None, **train) -> Path:
    """The shipped tiny config with `train` (and `sample`) overrides."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["train"] |= train
    cfg["sample"] |= sample or {}
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
    cmd += ["--val-shards", str(shards)]  # used where the config asks for train.val_every
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-8000:]
    return r.stderr


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    previews = {"prompts": PROMPTS, "steps": 2, "frames": 2}
    return tiny_yaml(tmp_path_factory.mktemp("cfg"), previews, ckpt_every=2, sample_every=2,
                     val_every=2, val_batches=2)  # fmt: skip


@pytest.fixture(scope="module")
def torchrun_run(config, four_shards, tmp_path_factory) -> tuple[Path, str]:
    """4 steps on 2 torchrun ranks, checkpoints at steps 2 and 4: (run dir, its stderr)."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    return run, torchrun(config, four_shards, run, 4)


def check_two_rank_run(run: Path, shards: Path) -> dict[int, dict]:
    """What every 2-rank, 4-step run must show; returns its metrics rows by step."""
    got = rows(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in got.values())

    # both ranks trained, on different clips: per step one batch from each rank, and over the
    # first epoch (steps 1-2) each rank read its own two whole shards
    assert all(len(r["keys"]) == 2 and all(len(k) == 2 for k in r["keys"]) for r in got.values())
    where = shard_of_key(shards)
    epoch0 = [{where[k] for s in (1, 2) for k in got[s]["keys"][rank]} for rank in (0, 1)]
    assert len(epoch0[0]) == len(epoch0[1]) == 2 and not epoch0[0] & epoch0[1], epoch0
    for r in got.values():
        assert not set(r["keys"][0]) & set(r["keys"][1]), r["keys"]

    # checkpoints in RUN_DIR, holding both ranks' stream and RNG states
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000002.ckpt", "step-00000004.ckpt"]
    assert os.readlink(run / "last.ckpt") == "checkpoints/step-00000004.ckpt"
    ckpt = load_checkpoint(run / "last.ckpt")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    # validation at steps 2 and 4 (each rank one of the 2 held-out batches, all-reduced): the
    # loss of step 4's weights on those 4 clips, as one process computes it from the checkpoint
    assert [s for s in sorted(got) if "val_loss" in got[s]] == [2, 4]
    import hdvg.t2v.train as train
    from hdvg.t2v.sample import load_for_sampling

    c, unet, text_encoder, vae = load_for_sampling(run / "last.ckpt", torch.device("cpu"), False)
    alphas = train.noise_scheduler(c).alphas_cumprod
    batches = train.validation_set(c, text_encoder, vae, alphas, torch.device("cpu"))
    assert len(batches) == 2
    val = float(train.validation_loss(unet, batches, c.train.precision, torch.device("cpu")))
    assert val == pytest.approx(got[4]["val_loss"], rel=1e-5)
    assert [sorted(d["cursors"]) for d in ckpt["data"]] == [[0], [1]]  # worker 0 of rank 0, 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["ckpt_every"] == 2
    return got


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_stream_and_resume(
    config, four_shards, torchrun_run, tmp_path
):
    full, log = torchrun_run
    got = check_two_rank_run(full, four_shards)
    assert log.count("saved checkpoint") == 2  # each checkpoint written once, by rank 0
    ckpt = load_checkpoint(full / "last.ckpt")

    # previews at steps 2 and 4, the prompts shared out (i on rank i % 2): what `hdvg sample`
    # makes from that step's checkpoint, whichever rank sampled it
    assert (
        log.count("rank 0: sampled prompt(s) 0,2") == log.count("rank 1: sampled prompt(s) 1") == 2
    )
    for step in (2, 4):
        where = full / "samples" / f"step-{step:08d}"
        assert sorted(p.name for p in where.iterdir()) == [
            f"{i:02d}.{x}" for i in range(3) for x in ("mp4", "txt")
        ]
    ref = tmp_path / "ref.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "hdvg",
        "sample",
        "--ckpt",
        str(full / "checkpoints" / "step-00000004.ckpt"),
        "--prompt",
        PROMPTS[1],
        "--out",
        str(ref),
        "--frames",
        "2",
        "--steps",
        "2",
        "--seed",
        "1",
    ]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert (full / "samples" / "step-00000004" / "01.mp4").read_bytes() == ref.read_bytes()

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


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_after_the_same_step(four_shards, tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after one same step (their flags are
    all-reduced), rank 0 saves that step's checkpoint with both ranks' states, and each rank
    exits 143."""
    import psutil

    run = tmp_path / "run"
    config = tiny_yaml(tmp_path, steps=500, ckpt_every=1000)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "hdvg.t2v.cli", "train", str(config), "--shards", str(four_shards)]
    with training_run([*cmd, "--output", str(run)], env, run) as proc:
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            rank = child.environ().get("RANK") if "hdvg.t2v.cli" in child.cmdline() else None
            if rank is not None and child.ppid() == proc.pid:
                ranks[rank] = child
        assert set(ranks) == {"0", "1"}, ranks
        ranks["1"].send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # ranks that disagree would wait forever
    assert err.count("SIGTERM: stopping after this step") == 1, err[-3000:]  # rank 1's
    # torchrun's failure report: each rank's exit code. The rank that ends first ends with
    # 143; torchrun then SIGTERMs the other, which may still be shutting down after the
    # closing barrier (past the checkpoint) and so end by that signal (-15) rather than 143
    exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", err))
    assert set(exits) == {"0", "1"} and "143" in exits.values(), err[-3000:]
    assert set(exits.values()) <= {"143", "-15"}, err[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", err).group(1))
    assert os.readlink(run / "last.ckpt") == f"checkpoints/step-{stopped:08d}.ckpt"
    ckpt = load_checkpoint(run / "last.ckpt")
    assert ckpt["step"] == stopped and len(ckpt["data"]) == 2 and len(ckpt["rng"]) == 2
    assert max(rows(run)) == stopped


@pytest.mark.slow
def test_ray_train_runs_the_same_loop(
    ray_local, config, four_shards, torchrun_run, tmp_path, capsys
):
    """2 CPU workers on a real local Ray: the torchrun run's clips, losses and weights."""
    from hdvg.t2v.cli import main as cli

    run = tmp_path / "ray_run"
    argv = ["train", str(config), "--shards", str(four_shards), "--output", str(run),
            "--val-shards", str(four_shards)]  # fmt: skip
    # mistakes fail on the driver, in one line, before any worker starts
    assert cli(argv + ["--ray-workers", "2", "--ray-gpus-per-worker", "1"]) == 2
    assert "has no GPUs" in capsys.readouterr().err
    bad = ["train", str(config), "--shards", str(tmp_path / "none"), "--output", str(run)]
    assert cli(bad + ["--ray-workers", "2"]) == 2
    assert "no shards at" in capsys.readouterr().err and not run.exists()
    bad = ["train", str(config), "--shards", str(four_shards), "--output", str(run)]
    assert cli(bad + ["--ray-workers", "2"]) == 2  # train.val_every without held-out shards
    assert "train.val_every needs held-out shards" in capsys.readouterr().err
    assert not run.exists()

    assert cli(argv + ["--steps", "4", "--ray-workers", "2", "--ray-cpus-per-worker", "1"]) == 0
    got = check_two_rank_run(run, four_shards)
    want = rows(torchrun_run[0])
    for s in (1, 2, 3, 4):
        assert (got[s]["loss"], got[s]["keys"]) == (want[s]["loss"], want[s]["keys"]), s
        assert got[s].get("val_loss") == want[s].get("val_loss"), s
    a = load_checkpoint(run / "last.ckpt")["model"]
    b = load_checkpoint(torchrun_run[0] / "last.ckpt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())

    # a worker's bad input (shards with nothing to train on) ends the launch as it ends a
    # single-process run: exit 2, its reason as the last line, not Ray's wrapped traceback --
    # also when restarts are allowed without limit: a restart would fail the same way, so the
    # restarted workers return at once (ray/abort.json) instead of failing forever
    from tests.t2v.test_data import bad_shards

    capsys.readouterr()
    nothing = bad_shards(tmp_path / "bad")
    argv = ["train", str(config), "--shards", str(nothing), "--output", str(tmp_path / "r2"),
            "--val-shards", str(four_shards)]  # fmt: skip
    one = ["--ray-workers", "1", "--ray-cpus-per-worker", "1", "--ray-max-failures", "-1"]
    assert cli(argv + ["--steps", "1"] + one) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hdvg train: loader worker 0: no usable clip"), last
    # a diverged run (lr 1e30: every step's gradients non-finite) likewise: exit 1, one line
    diverges = tiny_yaml(tmp_path, lr=1e30, warmup_steps=1, max_nonfinite_steps=2)
    argv = ["train", str(diverges), "--shards", str(four_shards), "--output", str(tmp_path / "r3")]
    assert cli(argv + ["--steps", "6"] + one) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"hdvg train: steps \d+-\d+ had non-finite gradients", last), last


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_train_rides_out_a_node_preemption(four_shards, tmp_path):
    """A spot reclaim under Ray Train: the node holding both workers is drained for preemption
    at step 3 with a 4-s deadline (tests/t2v/preempt_driver.py, a local 3-node Ray). The
    trainer checkpoints at the notice and trains on; Ray tears the workers down at the deadline
    and starts them on the other node, where they resume from that checkpoint -- not from
    step 0 -- and finish. Every step is logged once, with the losses and clips of an
    uninterrupted run."""
    config = tiny_yaml(tmp_path, ckpt_every=1000)  # no periodic checkpoint to fall back on
    steps = 40
    ref = tmp_path / "ref"
    torchrun(config, four_shards, ref, steps)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tests.t2v.preempt_driver", str(config), str(four_shards),
           str(run), str(steps), "3", "4"]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-6000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0 and out["at_step"] >= 3, (out, r.stderr[-6000:])

    jit = re.findall(r"checkpoint after step (\d+) for the preemption notice", r.stderr)
    assert len(jit) == 1, r.stderr[-6000:]  # rank 0's, once
    at = int(jit[0])
    assert out["at_step"] <= at < steps
    assert "PreemptionError" in r.stderr  # Ray tore the first workers down at the deadline
    resumed = re.findall(r"resumed from \S+ at step (\d+)", r.stderr)
    assert resumed == [str(at)] * 2, r.stderr[-6000:]  # both ranks of the restart, from there
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step-{at:08d}.ckpt", f"step-{steps:08d}.ckpt"
    ]  # fmt: skip
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, steps + 1))
    got, want = rows(run), rows(ref)
    for s in range(1, steps + 1):
        assert (got[s]["loss"], got[s]["keys"]) == (want[s]["loss"], want[s]["keys"]), s
    a = load_checkpoint(run / "last.ckpt")
    b = load_checkpoint(ref / "last.ckpt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())


@pytest.mark.slow
def test_sigterm_to_the_ray_driver_checkpoints_and_stops(four_shards, tmp_path):
    """`hdvg train --ray-workers 2` on a local Ray, SIGTERM to the driver alone (as `ray job
    stop` or a scheduler sends it): both workers stop after one same step with a checkpoint
    of it holding both ranks' states, and the launch exits 143."""
    config = tiny_yaml(tmp_path, ckpt_every=1000)  # the only checkpoint: the stop's
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "hdvg", "train", str(config), "--shards", str(four_shards),
           "--output", str(run), "--steps", "1000", "--ray-workers", "2",
           "--ray-cpus-per-worker", "1"]  # fmt: skip
    with training_run(cmd, env, run, rows=3) as proc:  # its group (Ray too) killed on the way out
        proc.send_signal(signal.SIGTERM)  # the driver alone
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-4000:]
    assert "SIGTERM: the workers stop after their step in progress" in err
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", err).group(1))
    assert os.readlink(run / "last.ckpt") == f"checkpoints/step-{stopped:08d}.ckpt"
    ckpt = load_checkpoint(run / "last.ckpt")
    assert ckpt["step"] == stopped < 1000 and len(ckpt["data"]) == len(ckpt["rng"]) == 2
    assert max(rows(run)) == stopped


def test_ray_flags_parse():
    import argparse

    from hdvg.t2v.cli import register

    parser = argparse.ArgumentParser(prog="hdvg")
    register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["train", "c.yaml", "--shards", "S", "--output", "R"])
    assert (a.ray_address, a.ray_workers, a.ray_gpus_per_worker) == (None, None, None)
    a = parser.parse_args(
        ["train", "c.yaml", "--shards", "S", "--output", "R", "--ray-address", "auto"]
        + ["--ray-workers", "3", "--ray-gpus-per-worker", "0.5", "--ray-cpus-per-worker", "4"]
    )
    assert (a.ray_address, a.ray_workers, a.ray_gpus_per_worker, a.ray_cpus_per_worker) == (
        "auto",
        3,
        0.5,
        4.0,
    )
