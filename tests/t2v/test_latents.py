"""The `latents` curation stage: a real `curate` with a tiny random VAE saved to disk writes
`{key}.latents.npy` into the shards; the trainer reads them instead of the mp4 and gets what it
would have computed from the mp4 itself."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hdvg.t2v.config import ConfigError, T2VConfig, VAEConfig, from_dict
from tests.t2v.conftest import tiny_config_dict

WINDOW = {"frames": 4, "size": [32, 32], "fps": 4.0}  # the t2v data section both sides use


def members(out: Path) -> dict[str, bytes]:
    got = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            got |= {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    return got


@pytest.fixture(scope="module")
def latents_out(ray_local, media_dir, tiny_vae_dir, tmp_path_factory) -> Path:
    """hd720 (two accepted scenes) and sd480 (rejected: resolution), latents stage last."""
    from hdvg.config import from_dict as pipeline
    from hdvg.runner import curate

    src = tmp_path_factory.mktemp("latents_src") / "sources.txt"
    src.write_text(f"{media_dir['hd720.mp4'].path}\n{media_dir['sd480.mp4'].path}\n")
    cfg = pipeline({
        "filters": {"duration": {"min_s": 2.0}, "resolution": {"min_short_side": 720}},
        # tiny_vae_dir is a pipeline-style folder with vae/ inside
        "clip_stages": {"latents": {"path": str(tiny_vae_dir), "batch_size": 2, **WINDOW}},
        "models": {"device": "cpu"},
    })  # fmt: skip
    out = tmp_path_factory.mktemp("latents") / "out"
    curate(cfg, str(src), out, quiet=True)
    return out


def t2v_cfg(vae_dir: Path, use_latents: bool, **data) -> T2VConfig:
    d = tiny_config_dict(
        vae={"random_init": None, "path": str(vae_dir)},
        data={**WINDOW, "random_start": False, "use_latents": use_latents, **data},
    )
    return from_dict(T2VConfig, d)


def test_shards_hold_latents_the_trainer_would_compute(latents_out, tiny_vae_dir):
    import pyarrow.parquet as pq

    from hdvg.manifest.verify import verify
    from hdvg.t2v.data import ShardClips, to_model_range
    from hdvg.t2v.vae import VideoVAE

    rows = pq.read_table(latents_out / "manifest" / "clips").to_pylist()
    accepted = sorted(r["clip_id"] for r in rows if r["status"] == "accepted")
    assert len(accepted) == 2 and any(r["reason"] == "resolution" for r in rows)
    got = members(latents_out)
    assert sorted(n for n in got if n.endswith(".latents.npy")) == [
        f"{k}.latents.npy" for k in accepted
    ]
    for k in accepted:
        assert json.loads(got[f"{k}.json"])["extras"] == ["latents.npy"]
    rep = verify(latents_out)
    assert rep.ok, [str(p) for p in rep.problems]

    # the trainer's own path from the mp4: its loader's frames, its VAE (posterior mean)
    vae = VideoVAE(VAEConfig(path=str(tiny_vae_dir)))
    from_mp4 = {}
    for item in ShardClips(str(latents_out), t2v_cfg(tiny_vae_dir, False).data):
        from_mp4[item["key"]] = vae.encode(to_model_range(item["video"][None]), sample=False)[0]
        if len(from_mp4) == 2:
            break
    stored = {}
    for item in ShardClips(str(latents_out), t2v_cfg(tiny_vae_dir, True).data):
        assert "video" not in item  # nothing decoded
        stored[item["key"]] = item["latents"]
        if len(stored) == 2:
            break
    assert sorted(stored) == sorted(from_mp4) == accepted
    for k in accepted:
        npy = np.load(io.BytesIO(got[f"{k}.latents.npy"]))
        assert npy.dtype == np.float16 and npy.shape == (4, 4, 8, 8)  # (c, F, 32/4, 32/4)
        assert torch.equal(stored[k], torch.from_numpy(npy))
        assert stored[k].float().std() > 0.01  # not a constant
        torch.testing.assert_close(stored[k].float(), from_mp4[k], rtol=1e-3, atol=5e-4)


def test_training_reads_stored_latents(latents_out, tiny_vae_dir, tmp_path):
    from hdvg.t2v.train import main

    cfg = t2v_cfg(tiny_vae_dir, True)
    cfg.train.steps, cfg.train.ckpt_every = 2, 100
    assert main(cfg, str(latents_out), tmp_path / "run") == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # latents curated for another window are refused, with what to do about it
    with pytest.raises(ConfigError, match=r"shard latents have shape \(4, 4, 8, 8\)"):
        main(t2v_cfg(tiny_vae_dir, True, frames=6), str(latents_out), tmp_path / "run6")


def test_shards_mixing_stored_latents_and_mp4_only_clips(latents_out, tiny_vae_dir, tmp_path):
    """Clips curated before the latents stage (mp4 only) train beside clips with latents."""
    from hdvg.t2v.data import ShardClips, make_loader
    from hdvg.t2v.train import main

    out = tmp_path / "mixed"
    shutil.copytree(latents_out, out)
    dropped = None
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        if dropped is None:
            dropped = next(m.name for m, _ in kept if m.name.endswith(".latents.npy"))
        with tarfile.open(p, "w") as tf:
            for m, data in kept:
                if m.name != dropped:
                    tf.addfile(m, io.BytesIO(data))
    cfg = t2v_cfg(tiny_vae_dir, True, batch_size=2, num_workers=0)
    batch = next(iter(make_loader(ShardClips(str(out), cfg.data), cfg.data)))
    key = dropped.split(".")[0]
    assert batch["key"][1] == key  # the mp4-only clip comes after the stored latents
    assert batch["latents"].shape == (1, 4, 4, 8, 8) and batch["video"].shape == (1, 3, 4, 32, 32)
    cfg.train.steps, cfg.train.ckpt_every = 2, 100
    assert main(cfg, str(out), tmp_path / "run") == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_latents_holding_nan_fall_back_to_the_mp4(latents_out, tiny_vae_dir, tmp_path):
    """Stored latents with a NaN or an infinity would make their whole step's gradients
    non-finite: the stream treats them as not loading and decodes the clip's mp4."""
    from hdvg.t2v.data import ShardClips, make_loader

    out = tmp_path / "poisoned"
    shutil.copytree(latents_out, out)
    shard = sorted((out / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    name = next(m.name for m, _ in kept if m.name.endswith(".latents.npy"))
    with tarfile.open(shard, "w") as tf:
        for m, data in kept:
            if m.name == name:
                array = np.load(io.BytesIO(data))
                array.flat[7] = np.inf if array.dtype.kind == "f" else 0
                buf = io.BytesIO()
                np.save(buf, array)
                data = buf.getvalue()
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    cfg = t2v_cfg(tiny_vae_dir, True, batch_size=2, num_workers=0)
    batch = next(iter(make_loader(ShardClips(str(shard), cfg.data), cfg.data)))
    key = name.split(".")[0]
    assert key in batch["key"] and batch["key"][-1] == key  # decoded: after the latents clips
    assert batch["video"].shape[0] == 1 and torch.isfinite(batch["latents"]).all()


def test_takedown_keeps_the_others_latents(latents_out, tmp_path):
    from hdvg.manifest.takedown import takedown
    from hdvg.manifest.verify import verify

    out = tmp_path / "out"
    shutil.copytree(latents_out, out)
    before = members(out)
    first = sorted(n.split(".")[0] for n in before if n.endswith(".latents.npy"))[0]
    takedown(out, clips=[first], reason="test")
    after = members(out)
    assert not any(n.startswith(first) for n in after)
    kept = [n for n in after if n.endswith(".latents.npy")]
    assert len(kept) == 1 and after[kept[0]] == before[kept[0]]
    assert verify(out).ok


def test_shard_extras_are_sorted_offset_and_deterministic(tmp_path):
    from hdvg.shards import ShardWriter

    def write(d: Path) -> tuple[Path, list[dict]]:
        w = ShardWriter(d, 0)
        rows = [
            w.add("a_0000", b"mp4-a" * 300, "cap a", {"clip_id": "a_0000"}),
            # "audio.flac" sorts before "json": the mp4 offset must count it
            w.add(
                "b_0000",
                b"mp4-b" * 7,
                "cap b",
                {"clip_id": "b_0000"},
                {"latents.npy": b"L" * 1000, "audio.flac": b"F" * 600},
            ),  # fmt: skip
        ]
        w.close()
        return w.commit(), rows

    p1, rows = write(tmp_path / "one")
    p2, _ = write(tmp_path / "two")
    assert p1.read_bytes() == p2.read_bytes()
    with tarfile.open(p1) as tf:
        names = tf.getnames()
        assert names == ["a_0000.json", "a_0000.mp4", "a_0000.txt", "b_0000.audio.flac",
                         "b_0000.json", "b_0000.latents.npy", "b_0000.mp4", "b_0000.txt"]  # fmt: skip
        for r in rows:
            mp4 = tf.getmember(f"{r['clip_id']}.mp4")
            assert mp4.offset_data == r["tar_offset"]
            meta = json.loads(tf.extractfile(f"{r['clip_id']}.json").read())
            assert meta["tar_offset"] == r["tar_offset"]
        assert json.loads(tf.extractfile("b_0000.json").read())["extras"] == [
            "audio.flac", "latents.npy"
        ]  # fmt: skip
        assert "extras" not in json.loads(tf.extractfile("a_0000.json").read())
    with pytest.raises(ValueError, match="bad extra member name"):
        ShardWriter(tmp_path / "three", 0).add("c_0000", b"x", "", {}, {"mp4": b"y"})


def test_stage_config_weights_and_hdvg_models(tiny_vae_dir, tmp_path, capsys):
    from hdvg.cli import main as cli
    from hdvg.config import ConfigError as PipelineConfigError
    from hdvg.config import from_dict as pipeline
    from hdvg.models import ModelNotFoundError
    from hdvg.pipeline import build_stages

    with pytest.raises(PipelineConfigError, match="exactly one of fps and stride"):
        pipeline({"clip_stages": {"latents": {"path": "x", "fps": 8.0, "stride": 2}}})
    cfg = pipeline({"clip_stages": {"latents": {"path": str(tmp_path / "no_vae")}}})
    with pytest.raises(ModelNotFoundError, match=r"stage latents: model no_vae not found in"):
        build_stages(cfg, "clip_stages")
    recipe = tmp_path / "p.yaml"
    recipe.write_text(json.dumps({"clip_stages": {"latents": {"path": str(tiny_vae_dir)}}}))
    assert cli(["models", str(recipe), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["stage"], row["found"]) == ("latents", True)
    assert row["resolved"] == str(tiny_vae_dir / "vae")  # the pipeline folder's VAE
    assert cli(["models"]) == 0  # every model stage at its defaults: latents listed
    assert "ali-vilab/text-to-video-ms-1.7b" in capsys.readouterr().out


def test_writer_spools_extras_and_a_killed_run_drops_them(tmp_path):
    from hdvg.manifest.writer import DatasetWriter, Ledger
    from hdvg.records import Clip, SourceRecord, SourceResult

    def result() -> SourceResult:
        clip = Clip("s_0000", "s", "u", 0, 0, 2, 0, 50, 2, 1280, 720, 25.0, data=b"mp4" * 99)
        clip.extras["latents.npy"] = b"L" * 300
        return SourceResult(SourceRecord("s", "u", 0), [clip])

    out = tmp_path / "out"
    DatasetWriter(out, {}, []).add(result())  # killed before its shard committed
    spool = out / ".work" / "spool"
    assert sorted(p.name for p in spool.iterdir()) == ["s_0000.latents.npy", "s_0000.mp4"]
    Ledger(out)  # the rerun's start
    assert not list(spool.iterdir())
    w = DatasetWriter(out, {}, [])
    w.add(result())
    w.close()
    assert members(out)["s_0000.latents.npy"] == b"L" * 300
    assert not list(spool.iterdir())
