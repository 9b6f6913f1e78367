"""Caption / CLIP / aesthetic / learned-watermark stages with tiny random-weight models
built from configs and saved where real weights would go: the real loading code, real
batched generation, captions in the shards and the manifest. Plus the missing-weights
error and `hdvg models`."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdvg import media
from hdvg.cli import main as cli
from hdvg.config import ModelsConfig, from_dict
from hdvg.media import VideoSpec
from hdvg.models import ModelNotFoundError
from hdvg.pipeline import build_stages
from hdvg.records import Clip
from hdvg.stages import build_stage
from hdvg.stages.models import testing as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("weights")
    oc = T.save_tiny_open_clip(d / "open_clip")
    return {
        "blip2": str(T.save_tiny_blip2(d / "blip2")),
        "blip": str(T.save_tiny_blip(d / "blip")),
        "open_clip": str(oc),
        "aesthetic": str(T.save_laion_mlp_head(d / "aesthetic.pth", 32)),
        "watermark": str(T.save_linear_head(d / "watermark.pth", 32, 2)),
    }


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("cap") / "c.mp4"
    return media.make_video(p, VideoSpec(320, 180, 25, (2.0,))).read_bytes()


def _clips(data: bytes, n: int) -> list[Clip]:
    return [Clip(f"s{i}_0000", f"s{i}", "u", 0, 0, 2, 0, 50, 2, 320, 180, 25.0, data=data)
            for i in range(n)]  # fmt: skip


def _stage(name: str, params: dict):
    st = build_stage(name, params)
    st.bind(ModelsConfig())
    st.setup()
    return st


def test_blip2_batched_captions(tiny, clip_bytes):
    st = _stage("caption", {"path": tiny["blip2"], "batch_size": 2, "min_new_tokens": 4,
                            "max_new_tokens": 6})  # fmt: skip
    clips = _clips(clip_bytes, 5)  # batches of 2, 2, 1
    st.process_batch(clips, [None] * 5)
    for c in clips:
        assert c.caption  # random weights: 4-6 tokens of anything
        assert c.caption_model.startswith("blip2@local-")
    assert len({c.caption for c in clips}) == 1  # the same clip gives the same caption


def test_blip2_static_kv_cache_gives_the_same_captions(tiny, clip_bytes):
    # caption.cache: static preallocates the KV cache (on CUDA, generate then compiles the
    # decode step into CUDA graphs); the text must not change, token for token
    params = {"path": tiny["blip2"], "batch_size": 3, "min_new_tokens": 5, "max_new_tokens": 8}
    dyn = _stage("caption", params)
    sta = _stage("caption", {**params, "cache": "static"})
    assert sta.generate_kwargs()["cache_implementation"] == "static"
    assert "cache_implementation" not in dyn.generate_kwargs()
    a, b = _clips(clip_bytes, 4), _clips(clip_bytes, 4)  # batches of 3 and 1
    shapes = {}
    for name, st in (("dyn", dyn), ("sta", sta)):
        gen = st.model.generate

        def spy(*args, _gen=gen, _name=name, **kw):
            shapes.setdefault(_name, []).append(tuple(kw["pixel_values"].shape[:1]))
            return _gen(*args, **kw)

        st.model.generate = spy
    dyn.process_batch(a, [None] * 4)
    sta.process_batch(b, [None] * 4)
    # the short last batch runs padded under the static cache (one shape, one compile on
    # CUDA), and its real rows' captions are those of the unpadded dynamic run
    assert shapes == {"dyn": [(3,), (1,)], "sta": [(3,), (3,)]}
    assert [c.caption for c in b] == [c.caption for c in a]
    assert all(c.caption for c in b)
    with pytest.raises(Exception, match="caption.cache"):
        build_stage("caption", {"cache": "paged"})


@pytest.mark.parametrize("backend", ["cudagraphs", "inductor"])
def test_static_cache_compiles_the_decode_step(tiny, clip_bytes, monkeypatch, backend):
    # caption.static_compile picks what compiles generate's decode step under the static
    # cache: dynamo + CUDA graphs of the eager kernels (default, seconds to build), or
    # transformers' inductor "reduce-overhead". transformers compiles only on CUDA; told to
    # compile on every device, the CPU runs the same traced step (cudagraphs falls back to
    # its eager kernels there), once per run, and the captions are the dynamic cache's
    import torch
    from transformers import CompileConfig

    monkeypatch.setattr(CompileConfig, "_compile_all_devices", True)
    compiles = []
    real = torch.compile

    def spy(fn, **kw):
        compiles.append((kw["backend"], kw["mode"]))
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    params = {"path": tiny["blip2"], "batch_size": 2, "min_new_tokens": 4, "max_new_tokens": 4}
    dyn = _stage("caption", params)
    sta = _stage("caption", {**params, "cache": "static", "static_compile": backend})
    a, b = _clips(clip_bytes, 4), _clips(clip_bytes, 4)
    dyn.process_batch(a, [None] * 4)
    assert compiles == []  # the dynamic cache never compiles
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    sta.process_batch(b, [None] * 4)
    want = ("cudagraphs", None) if backend == "cudagraphs" else ("inductor", "reduce-overhead")
    assert compiles == [want]  # two batches, one compile
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step ran traced
    assert [c.caption for c in b] == [c.caption for c in a]
    assert all(c.caption for c in b)
    with pytest.raises(Exception, match="caption.static_compile"):
        build_stage("caption", {"cache": "static", "static_compile": "tensorrt"})


def test_blip_multi_frame_and_named_revision(tiny, clip_bytes):
    st = _stage("caption", {"backend": "blip", "path": tiny["blip"], "frames": "multi",
                            "n_frames": 3, "model": "Salesforce/blip-image-captioning-large",
                            "revision": "abc123", "min_new_tokens": 3})  # fmt: skip
    clips = _clips(clip_bytes, 2)
    st.process_batch(clips, [None] * 2)
    assert all(c.caption for c in clips)
    assert clips[0].caption_model == "Salesforce/blip-image-captioning-large@abc123"


def test_clip_aesthetic_watermark_scores(tiny, clip_bytes):
    clips = _clips(clip_bytes, 3)
    clips[0].caption = "a dog on the beach"
    clips[1].source_caption = "a red car"
    for name, extra in (("clip_score", {"min_score": None}),
                        ("aesthetic", {"head": tiny["aesthetic"], "min_score": None}),
                        ("watermark", {"head": tiny["watermark"], "max_score": None})):  # fmt: skip
        _stage(name, {"path": tiny["open_clip"], **extra}).process_batch(clips, [None] * 3)
    assert -1 <= clips[0].scores["clip_score"] <= 1 and clips[1].scores["clip_score"] is not None
    assert clips[2].scores["clip_score"] is None  # no text: no score, no decision
    assert all(isinstance(c.scores["aesthetic_score"], float) for c in clips)
    assert all(0 <= c.scores["watermark_score"] <= 1 for c in clips)
    assert all(c.status == "accepted" for c in clips)


def test_head_for_another_backbone_is_a_clear_error(tiny, tmp_path):
    head = T.save_laion_mlp_head(tmp_path / "l14.pth", 768)
    st = build_stage("aesthetic", {"path": tiny["open_clip"], "head": str(head)})
    st.bind(ModelsConfig())
    with pytest.raises(ValueError, match="expects 768-d embeddings"):
        st.setup()


def test_missing_weights_name_stage_model_and_path(tmp_path, capsys):
    raw = {"clip_stages": {"caption": {"model": "Salesforce/blip2-opt-2.7b"}},
           "models": {"cache_dir": str(tmp_path / "hub")}}  # fmt: skip
    cfg = from_dict(raw)
    with pytest.raises(ModelNotFoundError) as e:
        build_stages(cfg, "clip_stages")
    msg = str(e.value)
    assert "stage caption" in msg and "Salesforce/blip2-opt-2.7b" in msg
    assert str(tmp_path / "hub") in msg and "models.allow_download" in msg
    # the CLI: exit 2 with that one line, before any work starts
    y = tmp_path / "p.yaml"
    y.write_text(json.dumps(raw))
    rc = cli(["curate", str(y), "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert rc == 2 and "stage caption: model Salesforce/blip2-opt-2.7b not found" in (
        capsys.readouterr().err)  # fmt: skip
    head = from_dict({"clip_stages": {"aesthetic": {"path": "/nope/oc", "head": "/nope/h.pth"}}})
    with pytest.raises(ModelNotFoundError, match="stage aesthetic: model oc not found in /nope/oc"):
        build_stages(head, "clip_stages")


def test_cpu_workers_yield_to_model_actors(tiny):
    """Source and frame-pool workers of a recipe with model stages lower their priority
    (models.cpu_nice) so a GPU actor's launch thread never waits for a core; others do not."""
    import multiprocessing as mp

    from hdvg.pipeline import yield_cpu

    def child(cfg, q):
        before = os.nice(0)
        yield_cpu(cfg)
        yield_cpu(cfg)  # once is enough: a second call changes nothing
        q.put((before, os.nice(0)))

    def niceness(raw):
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(from_dict(raw), q))
        p.start()
        p.join(30)
        return q.get(timeout=5)

    captions = {"clip_stages": {"caption": {"path": tiny["blip2"]}}}
    before, after = niceness(captions)
    assert after == max(before, 19)
    before, after = niceness({**captions, "models": {"cpu_nice": 0}})
    assert after == before
    before, after = niceness({})  # no model stages: nothing to yield to
    assert after == before


def _fake_topology(root, siblings: dict[int, str]) -> str:
    for cpu, text in siblings.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(text + "\n")
    return str(root)


def test_physical_cores_group_hardware_threads(tmp_path):
    """SMT siblings form one core (the kernel's list format, ranges and commas); a CPU with no
    readable topology is a core of its own; only the CPUs asked about count."""
    from hdvg.pipeline import physical_cores

    # 4 cores x 2 threads, numbered as Linux does on x86: cpu i and i + 4 share a core
    sysfs = _fake_topology(tmp_path / "smt", {i: f"{i % 4},{i % 4 + 4}" for i in range(8)})
    cores = physical_cores(set(range(8)), sysfs)
    assert cores == [frozenset({0, 4}), frozenset({1, 5}), frozenset({2, 6}), frozenset({3, 7})]
    assert physical_cores({1, 2, 5}, sysfs) == [frozenset({1, 5}), frozenset({2})]
    sysfs = _fake_topology(tmp_path / "ranges", {0: "0-1", 1: "0-1"})
    assert physical_cores({0, 1, 2}, sysfs) == [frozenset({0, 1}), frozenset({2})]


def test_cpu_workers_keep_cores_free_for_gpu_actors(tiny, tmp_path):
    """On a node with GPUs the CPU workers of a recipe with model stages keep off
    `models.actor_cores` physical cores per GPU (both hardware threads of each, the last ones),
    never more than half their cores; nothing changes without GPUs, with `actor_cores: 0`,
    on `models.device: cpu`, or without model stages; a model actor started in such a process
    (Ray reuses idle workers) takes them back. Each case in a forked child: its affinity, not
    this process's."""
    import multiprocessing as mp

    from hdvg import pipeline

    def child(raw, gpus, sysfs, q):
        pipeline.node_gpus, pipeline.SYSFS = (lambda: gpus), sysfs  # the node, as the child sees it
        pipeline._KEPT = None  # a fresh worker process
        before = os.sched_getaffinity(0)
        pipeline.yield_cpu(from_dict(raw))  # a source / frame-pool worker's first row
        pipeline.yield_cpu(from_dict(raw))  # once per process: no second cut
        kept, after = pipeline._KEPT or set(), os.sched_getaffinity(0)
        pipeline.ModelStageActor(from_dict(raw), stages=[])  # Ray may reuse it for an actor
        q.put((before, kept, after, os.sched_getaffinity(0)))

    def run(raw, gpus, sysfs):
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(raw, gpus, sysfs, q))
        p.start()
        p.join(30)
        return q.get(timeout=5)

    captions = {"clip_stages": {"caption": {"path": tiny["blip2"]}}}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    # one thread per core (this VM's topology, as the kernel reports it)
    flat = _fake_topology(tmp_path / "flat", {c: str(c) for c in allowed})
    before, kept, after, actor = run(captions, 1, flat)
    assert kept == {allowed[-1]} and after == before - kept
    assert actor == before  # an actor in that process has every core back
    # two hardware threads per core: the last core's pair, or nothing when that is over half
    pairs = {
        c: ",".join(map(str, allowed[i - i % 2 : i - i % 2 + 2])) for i, c in enumerate(allowed)
    }
    smt = _fake_topology(tmp_path / "smt", pairs)
    before, kept, after, _ = run(captions, 1, smt)
    n_cores = len(pipeline.physical_cores(set(allowed), smt))
    if n_cores >= 2:
        assert kept == set(allowed[-2:]) and after == before - kept
    else:
        assert kept == set() and after == before
    for raw, gpus in [
        (captions, 0),  # no GPU on the node
        ({**captions, "models": {"actor_cores": 0}}, 1),
        ({**captions, "models": {"device": "cpu"}}, 1),
        ({}, 1),  # no model stages
    ]:
        before, kept, after, _ = run(raw, gpus, flat)
        assert kept == set() and after == before, raw


def test_hdvg_models_lists_weights(tiny, tmp_path, capsys):
    y = tmp_path / "p.yaml"
    y.write_text(json.dumps({"clip_stages": {
        "caption": {"path": tiny["blip2"]},
        "aesthetic": {"path": tiny["open_clip"], "head": "missing.pth"}}}))  # fmt: skip
    assert cli(["models", str(y), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    found = {(r["stage"], r["model"]): r["found"] for r in rows}
    assert found[("caption", "blip2")] is True
    assert found[("aesthetic", "open_clip")] is True
    assert found[("aesthetic", "missing.pth")] is False
    assert cli(["models", str(y), "--check"]) == 1
    assert "missing.pth" in capsys.readouterr().out
    smoke = str(ROOT / "pipelines" / "smoke.yaml")  # weight-free stages only: said in words
    assert cli(["models", smoke, "--check"]) == 0
    assert capsys.readouterr().out == f"{smoke}: no stage needs model weights\n"


def _recipe(tiny, **models):
    return from_dict({
        "filters": {"duration": {"min_s": 2.0}, "resolution": {"min_short_side": 720}},
        "clip_stages": {
            "motion": {"min_motion": 0.0, "actor": True},
            "static_overlay": {"max_score": None, "actor": True},
            "watermark": {"path": tiny["open_clip"], "head": tiny["watermark"], "max_score": None},
            "aesthetic": {"path": tiny["open_clip"], "head": tiny["aesthetic"], "min_score": None},
            "caption": {"path": tiny["blip2"], "batch_size": 4, "min_new_tokens": 3,
                        "max_new_tokens": 5},
            "clip_score": {"path": tiny["open_clip"], "min_score": None},
        },
        "models": {"device": "cpu", "batch_size": 4, **models},
    })  # fmt: skip


@pytest.fixture(scope="module")
def two_shot_source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    media.make_video(src / "a.mp4", VideoSpec(1280, 720, 25, (2.2, 2.4)))
    return src


def test_curate_end_to_end_with_tiny_models(tiny, two_shot_source, ray_local, tmp_path):
    from hdvg.runner import curate

    out = tmp_path / "out"
    summary = curate(_recipe(tiny, frame_pool=False), str(two_shot_source), out, quiet=True)
    assert summary["counts"]["clips_by_status"] == {"accepted": 2}
    assert "frames" not in summary["stage_seconds"]  # decoded inside the actor
    rows = pq.read_table(out / "manifest" / "clips").to_pylist()
    for r in rows:
        assert r["caption"] and r["caption_model"].startswith("blip2@local-")
        for col in ("motion_score", "overlay_score", "watermark_score", "aesthetic_score",
                    "clip_score"):  # fmt: skip
            assert isinstance(r[col], float), col
    with tarfile.open(next((out / "shards").glob("*.tar"))) as tf:
        txt = {Path(m.name).stem: tf.extractfile(m).read().decode()
               for m in tf.getmembers() if m.name.endswith(".txt")}  # fmt: skip
    assert txt == {r["clip_id"]: r["caption"] for r in rows}

    # the same job with the CPU frame pool ahead of the actor (the default when the actors
    # get GPUs): frames decoded and pre-processed on CPU workers; the same scores, captions
    # and clip bytes (the shards' json differ only by the config hash)
    out2 = tmp_path / "out2"
    summary2 = curate(_recipe(tiny, frame_pool=True), str(two_shot_source), out2, quiet=True)
    assert summary2["stage_seconds"]["frames"] > 0
    rows2 = pq.read_table(out2 / "manifest" / "clips").to_pylist()
    cols = ["clip_id", "caption", "motion_score", "overlay_score", "watermark_score",
            "aesthetic_score", "clip_score", "sha256", "shard", "tar_offset"]  # fmt: skip
    assert [{k: r[k] for k in cols} for r in rows2] == [{k: r[k] for k in cols} for r in rows]

    # captions alone: the pool sends the clips' mp4 bytes past the actor in their own
    # column (`clip_data`); the clips come back whole, with the same captions
    cap = _recipe(tiny, frame_pool=True)
    cap.clip_stages = {"caption": cap.clip_stages["caption"]}
    out3 = tmp_path / "out3"
    curate(cap, str(two_shot_source), out3, quiet=True)
    rows3 = pq.read_table(out3 / "manifest" / "clips").to_pylist()
    cols = ["clip_id", "status", "caption", "sha256", "size_bytes"]
    assert [{k: r[k] for k in cols} for r in rows3] == [{k: r[k] for k in cols} for r in rows]
    assert cli(["manifest", "verify", str(out3)]) == 0  # the shards hold the clips' bytes


def test_actor_drops_pool_frames_before_results_travel(tiny, clip_bytes):
    import pickle

    import numpy as np
    import torch

    from hdvg.frames import MIDDLE_ONLY, decode_frames
    from hdvg.pipeline import ModelStageActor, model_stages, prepare_frames
    from hdvg.records import SourceRecord, SourceResult

    cap = {"path": tiny["blip2"], "min_new_tokens": 3, "max_new_tokens": 5}
    cfg = from_dict({"clip_stages": {"caption": cap}, "models": {"device": "cpu"}})
    r = SourceResult(SourceRecord("s0", "u", 0))
    r.clips = _clips(clip_bytes, 3)
    pool = model_stages(cfg)
    prepare_frames(pool, [r])  # what the frame pool does on a CPU worker
    fr = r.clips[0].frames
    assert fr.indices == [fr.n_frames // 2]  # captions only: the middle frame alone
    assert fr.images.shape[0] == 0  # the caption reads only its pixels: no frames travel
    ip = pool[0].processor.image_processor  # the pool loaded the processor only
    pix = fr.memo["caption_pixels"]
    assert pix.shape == (1, 3, ip.size["height"], ip.size["width"]) and pix.dtype == np.uint8
    assert not hasattr(pool[0], "model")
    # resized in the pool, normalised in the actor: exactly the whole processor's pixels
    mid = decode_frames(clip_bytes, MIDDLE_ONLY).images
    whole = ip(list(mid), return_tensors="pt")["pixel_values"]
    assert torch.equal(pool[0]._normalize(torch.from_numpy(pix)), whole)
    out = ModelStageActor(cfg)({"result": [pickle.dumps(r)]})
    back = pickle.loads(out["result"][0])
    assert all(c.caption and c.frames is None for c in back.clips)


def test_clip_bytes_pass_the_caption_actor_beside_its_rows(tiny, clip_bytes):
    """A caption-only recipe: the pool moves the clips' mp4 bytes to a column of their own,
    the actor (dict or Arrow batches, as Ray gives them) reads only the small rows and
    passes that column on as it came, and the driver gets the clips back whole."""
    import pickle

    import pyarrow as pa

    from hdvg.pipeline import ModelStageActor, frame_pool_row, result_of
    from hdvg.records import SourceRecord, SourceResult

    cap = {"path": tiny["blip2"], "min_new_tokens": 3, "max_new_tokens": 5}
    cfg = from_dict({"clip_stages": {"caption": cap}, "models": {"device": "cpu"}})
    r = SourceResult(SourceRecord("s0", "u", 0))
    r.clips = _clips(clip_bytes, 2) + [Clip("s0_0002", "s0", "u", 2, 0, 1, 0, 25, 1, 320, 180,
                                            25.0)]  # fmt: skip
    r.clips[2].status, r.clips[2].reason = "rejected", "aspect"  # never cut: no bytes
    row = frame_pool_row({"order": 0, "result": pickle.dumps(r)}, cfg)
    assert all(c.data is None for c in pickle.loads(row["result"]).clips)
    assert len(row["result"]) < len(clip_bytes) < len(row["clip_data"])
    actor = ModelStageActor(cfg)
    rows = [{"result": row["result"], "clip_data": row["clip_data"]}]
    arrow = actor(pa.Table.from_pylist(rows)).to_pylist()
    plain = actor({k: [v] for k, v in rows[0].items()})
    assert plain["clip_data"][0] is row["clip_data"]  # untouched
    for out in (arrow[0], {k: v[0] for k, v in plain.items()}):
        back = result_of(out)
        assert [c.data for c in back.clips] == [clip_bytes, clip_bytes, None]
        assert [bool(c.caption) for c in back.clips] == [True, True, False]
        assert back.clips[2].status == "rejected"
