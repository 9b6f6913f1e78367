"""The shard stream: specs, decode, skips, worker/node split, shuffling, resume."""

from __future__ import annotations

import random
import tarfile
from itertools import islice

import av
import numpy as np
import pytest
import torch

from hdvg.t2v.config import DataConfig
from hdvg.t2v.data import (
    NoClipsError,
    ShardClips,
    StreamState,
    decode_clip,
    expand_shards,
    frame_indices,
    make_loader,
    read_tar,
)


def cfg(**kw) -> DataConfig:
    base = {"frames": 4, "size": (32, 32), "fps": 4.0, "batch_size": 2, "num_workers": 0}
    return DataConfig(**{**base, **kw})


def test_shard_specs(shard_root):
    shards = sorted(str(p) for p in (shard_root / "shards").glob("*.tar"))
    assert expand_shards(str(shard_root)) == shards  # OUT dir -> OUT/shards
    assert expand_shards(str(shard_root / "shards")) == shards
    assert expand_shards(str(shard_root / "shards" / "shard-{000000..000002}.tar")) == shards
    assert expand_shards(str(shard_root / "shards" / "*.tar")) == shards
    assert expand_shards([shards[1], shards[0], shards[1]]) == [shards[1], shards[0]]
    assert expand_shards("file://" + shards[0]) == ["file://" + shards[0]]
    with pytest.raises(FileNotFoundError):
        expand_shards(str(shard_root / "nothing-here-*.tar"))


def test_samples_have_clip_and_caption(shard_root):
    ds = ShardClips(str(shard_root), cfg(size=(48, 64), frames=3))
    items = list(islice(iter(ds), 6))
    assert sorted(i["key"] for i in items) == sorted({i["key"] for i in items})  # one epoch
    for item in items:
        assert item["video"].shape == (3, 3, 48, 64) and item["video"].dtype == torch.uint8
        assert isinstance(item["caption"], str)
    assert "" in {i["caption"] for i in items}  # clip without a caption passes through
    assert "a zoom into the mandelbrot set" in {i["caption"] for i in items}


def test_fsspec_url(shard_root):
    ds = ShardClips("file://" + str(shard_root / "shards" / "shard-000000.tar"), cfg())
    assert len({i["key"] for i in islice(iter(ds), 4)}) == 2


def test_frame_sampling_fps_and_stride():
    rng = random.Random(0)
    c = cfg(frames=4, fps=5.0, random_start=False)
    assert frame_indices(40, 10.0, c, rng) == [0, 2, 4, 6]
    assert frame_indices(6, 10.0, c, rng) is None  # needs 7 source frames
    s = cfg(frames=3, fps=None, stride=3, random_start=False)
    assert frame_indices(7, 30.0, s, rng) == [0, 3, 6]
    r = cfg(frames=4, fps=5.0)
    starts = {frame_indices(100, 10.0, r, random.Random(i))[0] for i in range(20)}
    assert len(starts) > 1 and max(starts) <= 100 - 7


def test_decode_takes_exactly_the_sampled_frames_of_a_multi_gop_clip(tmp_path, monkeypatch):
    """A clip with short closed GOPs and B-frames (as a stream copy of web video keeps them):
    the loader decodes only the GOPs its window touches, and each sampled frame equals the
    same frame of a full decode (same resize and crop)."""
    import io

    from hdvg import ffmpeg

    path = tmp_path / "gops.mp4"
    src = "testsrc2=size=128x96:rate=24,noise=alls=20:allf=t"
    ffmpeg.run(["-y", "-f", "lavfi", "-i", src, "-t", "6", "-c:v", "libx264", "-preset",
                "veryfast", "-bf", "3", "-g", "12", "-sc_threshold", "0", "-pix_fmt", "yuv420p",
                str(path)], 120, what="test media")  # fmt: skip
    data = path.read_bytes()
    with av.open(io.BytesIO(data)) as c:  # every frame, resized to cover 32x32 and cropped
        every = [
            f.to_ndarray(width=43, height=32, format="rgb24", interpolation="AREA")[:, 5:37]
            for f in c.decode(video=0)
        ]
    from hdvg import frames as fr

    fed = []
    real = fr._needed_packets
    monkeypatch.setattr(
        fr, "_needed_packets", lambda *a: fed.append(sum(n := real(*a)) / len(n)) or n
    )
    c = cfg(frames=4, fps=6.0, size=(32, 32))
    starts = set()
    for seed in range(8):
        idx = frame_indices(len(every), 24.0, c, random.Random(seed))
        starts.add(idx[0])
        clip = decode_clip(data, c, random.Random(seed))
        assert clip.frames is not None, clip.reason
        assert all((clip.frames[k] == every[i]).all() for k, i in enumerate(idx)), seed
    assert len(starts) > 4  # windows across the clip, most not in its first GOP
    # a 13-frame window (4 frames, every 4th) touches at most 2 of the clip's 12 GOPs
    assert len(fed) == 8 and max(fed) <= 25 / 145


def test_decode_resizes_and_center_crops(tmp_path):
    # left half red, right half blue at 128x64: a 32x32 center crop keeps both halves
    from tests.t2v.conftest import _encode

    path = tmp_path / "halves.mp4"
    _encode(
        "color=c=red:size=64x64:rate=8[a];color=c=blue:size=64x64:rate=8[b];[a][b]hstack", 10, path
    )
    clip = decode_clip(path.read_bytes(), cfg(frames=2, fps=None, stride=2), random.Random(0))
    frames = clip.frames.astype(int)
    assert frames.shape == (2, 32, 32, 3)
    assert frames[:, :, :12, 0].mean() > 200 and frames[:, :, -12:, 2].mean() > 200
    assert decode_clip(b"not a video", cfg(), random.Random(0)).reason.startswith("decode_error")


@pytest.mark.parametrize("kind", ["rotated", "anamorphic"])
def test_decode_shows_the_picture_players_show(tmp_path, kind):
    """Shards of other tools may hold a phone video stored landscape with a display rotation,
    or anamorphic pixels (hdvg's own clips have neither): the trainer takes the upright,
    square-pixel picture -- the same crop as from the clip re-encoded upright by ffmpeg."""
    from hdvg import ffmpeg
    from hdvg.media import VideoSpec, make_video

    if kind == "rotated":  # stored 320x180, shown 180x320
        base = make_video(tmp_path / "b.mp4", VideoSpec(320, 180, 8, (2.0,)))
        src = tmp_path / "rot.mp4"
        ffmpeg.run(["-y", "-display_rotation", "90", "-i", str(base), "-c", "copy", str(src)], 60)
    else:  # stored 240x180 with 4:3 pixels, shown 320x180
        base = make_video(tmp_path / "b.mp4", VideoSpec(240, 180, 8, (2.0,)))
        src = tmp_path / "sar.mp4"
        ffmpeg.run(["-y", "-i", str(base), "-vf", "setsar=4/3", "-c:v", "libx264", "-preset",
                    "ultrafast", "-qp", "0", str(src)], 60)  # fmt: skip
    upright = tmp_path / "upright.mp4"  # ffmpeg's CLI turns and widens while re-encoding
    ffmpeg.run(["-y", "-i", str(src), "-vf", "scale=trunc(iw*sar/2)*2:ih,setsar=1", "-c:v",
                "libx264", "-preset", "ultrafast", "-qp", "0", str(upright)], 60)  # fmt: skip
    c = cfg(frames=4, fps=None, stride=2, size=(48, 64))
    got = decode_clip(src.read_bytes(), c, random.Random(0))
    want = decode_clip(upright.read_bytes(), c, random.Random(0))
    assert got.frames is not None and got.frames.shape == want.frames.shape == (4, 48, 64, 3)
    # resizing before or after the turn differs by ~8 levels; the picture taken as stored,
    # sideways or squeezed, is 124 / 53 levels off (checked)
    assert np.abs(got.frames.astype(int) - want.frames).mean() < 15


def test_too_short_clips_are_skipped_and_counted(shard_root):
    # 8 frames at 4 fps needs >= 1.75 s: the 1 s smpte clip is dropped, with a count
    ds = ShardClips(str(shard_root), cfg(frames=8))
    items = list(islice(iter(ds), 10))
    assert all("_0005" not in i["key"] for i in items)
    assert max(i["skipped_too_short"] for i in items) >= 1


def test_workers_and_ranks_partition_an_epoch(shard_root, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = ShardClips(str(shard_root), cfg(shuffle_buffer=1))
        loader = make_loader(ds, cfg(batch_size=1, num_workers=2))
        got = []
        for batch in islice(loader, 4):
            got += [(k, int(w)) for k, w in zip(batch["key"], batch["worker"], strict=True)]
        seen.append(got)
    workers = {w for got in seen for _, w in got}
    assert workers == {0, 1, 2, 3}  # global worker ids: rank * num_workers + worker
    keys = [k for got in seen for k, _ in got]
    assert len(set(keys)) >= 5  # 4 workers each start on a different part of the data


def test_shuffling_is_seeded(shard_root):
    def order(seed):
        return [i["key"] for i in islice(iter(ShardClips(str(shard_root), cfg(), seed=seed)), 12)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    first, second = order(0)[:6], order(0)[6:12]
    assert sorted(first) == sorted(second) and first != second  # a new order every epoch


def test_resume_continues_the_stream(shard_root):
    data_cfg = cfg(num_workers=2)
    ds = ShardClips(str(shard_root), data_cfg, seed=3)
    full = [b for b in islice(make_loader(ds, data_cfg), 6)]
    state = StreamState(data_cfg)
    for b in full[:3]:
        state.update(b)
    resumed = ShardClips(str(shard_root), data_cfg, seed=3)
    resumed.load_state(state.state_dict())
    rest = list(islice(make_loader(resumed, data_cfg), 3))
    for a, b in zip(full[3:], rest, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["video"], b["video"])  # same random crop start too


def test_decoded_frames_match_pyav(shard_root):
    # the loader's frames are the file's frames: compare against a plain full decode
    ds = ShardClips(
        str(shard_root), cfg(frames=2, fps=None, stride=1, random_start=False, size=(64, 64))
    )
    item = next(i for i in ds if i["key"].endswith("_0001"))  # mandelbrot 64x64: no resize
    from hdvg.t2v.data import read_tar

    raw = next(s for url in ds.urls for s in read_tar(url) if s["__key__"] == item["key"])
    import io

    with av.open(io.BytesIO(raw["mp4"])) as c:
        ref = np.stack([f.to_ndarray(format="rgb24") for f in islice(c.decode(video=0), 2)])
    np.testing.assert_array_equal(item["video"].permute(1, 2, 3, 0).numpy(), ref)


def test_resume_with_other_worker_count_is_refused(shard_root):
    state = StreamState(cfg(num_workers=2))
    with pytest.raises(ValueError, match="workers"):
        ShardClips(str(shard_root), cfg(num_workers=3)).load_state(state.state_dict())


def bad_shards(root, good: dict | None = None):
    """A shard of 3 samples whose mp4 is not a video (zero bytes, text, a cut-off mp4 header),
    plus ``good`` (a raw sample) when given."""
    import tarfile

    from tests.t2v.conftest import _add

    root.mkdir()
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i, data in enumerate([b"", b"not a video" * 50, b"\x00\x00\x00\x18ftypmp42" * 4]):
            _add(tar, f"bad{i:013d}_0000.mp4", data)
            _add(tar, f"bad{i:013d}_0000.txt", b"a caption")
        if good:
            for ext in ("json", "mp4", "txt"):
                _add(tar, f"{good['__key__']}.{ext}", good[ext])
    return root


def test_shards_without_a_usable_clip_fail_with_the_reason(shard_root, tmp_path):
    """A worker that reads all its shards once and can use none of their clips says so (it
    would read them forever, and the DataLoader, asking its workers in turn, would hang);
    one usable clip among bad ones keeps the stream going, epoch after epoch."""
    bad = bad_shards(tmp_path / "bad")
    with pytest.raises(NoClipsError, match=r"no usable clip .* \(3 undecodable, 0 shorter"):
        next(iter(ShardClips(str(bad), cfg())))
    # the real shards' clips, all too short for 64 frames at 4 fps
    with pytest.raises(NoClipsError, match=r"\(0 undecodable, 6 shorter than 64 frames"):
        next(iter(ShardClips(str(shard_root), cfg(frames=64))))
    # through a DataLoader worker: the same error type reaches the trainer
    loader = make_loader(ShardClips(str(bad), cfg(num_workers=1)), cfg(num_workers=1))
    with pytest.raises(NoClipsError, match="3 undecodable"):
        next(iter(loader))
    first = str(shard_root / "shards" / "shard-000000.tar")
    good = next(s for s in read_tar(first))
    mixed = ShardClips(str(bad_shards(tmp_path / "mixed", good)), cfg())
    items = list(islice(iter(mixed), 5))  # 5 epochs of 4 samples, one usable in each
    assert {i["key"] for i in items} == {good["__key__"]}
    assert 12 <= items[-1]["skipped_decode_error"] <= 15  # 4 epochs before, part of the 5th


def test_a_shard_that_breaks_off_ends_at_its_last_whole_sample(shard_root, tmp_path, caplog):
    """A truncated shard (a download cut short, a disk error) yields the samples before the
    break, warns, and the stream goes on with the other shards, counting the broken reads;
    shards that break off before their first sample end in NoClipsError saying so."""
    import shutil

    src = sorted((shard_root / "shards").glob("*.tar"))
    root = tmp_path / "cut"
    root.mkdir()
    for p in src:
        shutil.copy(p, root / p.name)
    whole = [s["__key__"] for s in read_tar(str(src[0]))]
    data = (root / src[0].name).read_bytes()
    # cut inside the second sample's mp4: the first sample is whole, the second is not
    second_mp4 = data.index(f"{whole[1]}.mp4".encode())
    (root / src[0].name).write_bytes(data[: second_mp4 + 512 + 1000])
    with pytest.raises(tarfile.ReadError):
        list(read_tar(str(root / src[0].name)))  # without an error list: raised
    caplog.set_level("WARNING", logger="hdvg.t2v.data")
    ds = ShardClips(str(root), cfg(frames=3))
    items = list(islice(iter(ds), 5))  # one epoch: the 6 clips less the cut one
    keys = {i["key"] for i in items}
    assert whole[0] in keys and whole[1] not in keys
    assert max(i["skipped_bad_shard"] for i in items) == 1
    assert max(i["skipped_too_short"] + i["skipped_decode_error"] for i in items) == 0
    assert any("breaks off after 1 samples" in r.getMessage() for r in caplog.records)
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "shard-000000.tar").write_bytes(data[:700])  # inside the first member
    with pytest.raises(NoClipsError, match=r"got no samples from 1 shard\(s\); 1 broke off"):
        next(iter(ShardClips(str(gone), cfg())))


def test_hostile_sample_metadata_costs_only_that_metadata(shard_root, tmp_path):
    """A sample's json that is not JSON, not an object, or holds odd hints, and stored latents
    that are not an .npy: the clip still trains from its mp4; latents that do not load and no
    mp4 count as undecodable. Nothing raises."""
    from tests.t2v.conftest import _add

    good = next(s for s in read_tar(str(sorted((shard_root / "shards").glob("*.tar"))[0])))
    root = tmp_path / "hostile"
    root.mkdir()
    jsons = [b"{not json", b"[1, 2, 3]", b'{"fps": {"x": 1}, "width": "wide"}', b"\xff\xfe"]
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i, meta in enumerate(jsons):
            key = f"{i:016x}_0000"
            _add(tar, f"{key}.json", meta)
            _add(tar, f"{key}.latents.npy", b"\x93NUMPY garbage")
            _add(tar, f"{key}.mp4", good["mp4"])
            _add(tar, f"{key}.txt", b"a caption")
        _add(tar, "ffffffffffffffff_0000.latents.npy", b"not an npy")  # and no mp4
    ds = ShardClips(str(root), cfg(use_latents=True))
    items = list(islice(iter(ds), 8))  # two epochs
    assert {i["key"] for i in items} == {f"{i:016x}_0000" for i in range(len(jsons))}
    assert all(i["video"].shape == (3, 4, 32, 32) and "latents" not in i for i in items)
    assert max(i["skipped_decode_error"] for i in items) >= 1


def test_shards_over_http_with_a_flaky_server(shard_root, tmp_path, capsys):
    """Shards streamed from a local HTTP server: a brace pattern asks only for its first and
    last shard up front (not all of them, and never a listing that downloads a shard); a
    server answering 503 for a while is tried again; one that keeps failing, or cuts its
    answer short, costs that shard (counted), not the run; an unreachable --shards is one
    line and exit 2."""
    import socket
    import time

    import yaml

    from hdvg.t2v.cli import main as cli
    from hdvg.t2v.data import ShardsUnreachable
    from tests.httpserver import LocalServer, Route
    from tests.t2v.conftest import tiny_config_dict

    src = sorted((shard_root / "shards").glob("*.tar"))
    local = {k for p in src for k in (s["__key__"] for s in read_tar(str(p)))}
    with LocalServer(shard_root / "shards", lifetime_s=120) as srv:
        pattern = srv.url("/files/shard-{000000..000002}.tar")
        assert expand_shards(pattern) == [srv.file_url(p.name) for p in src]
        assert [srv.hits(f"/files/{p.name}") for p in src] == [1, 0, 1]
        epoch = list(islice(iter(ShardClips(pattern, cfg(frames=3))), len(local)))
        assert {i["key"] for i in epoch} == local

        flaky = srv.route("/flaky.tar", Route(status=503, times=4, then=Route(file=src[0])))
        errors: list[str] = []
        assert [s["__key__"] for s in read_tar(flaky, errors)] == [
            s["__key__"] for s in read_tar(str(src[0]))
        ] and errors == []
        down = srv.route("/down.tar", Route(status=503, body=b"busy"))
        cut = srv.route("/cut.tar", Route(file=src[0], content_length=2 * src[0].stat().st_size))
        for url in (down, cut):
            errors = []
            assert list(read_tar(url, errors)) == [] and len(errors) == 1, url
        # a server that answers the headers and then says nothing: data.read_timeout_s
        hang = srv.route("/hang.tar", Route(file=src[0], hang_s=30))
        ds = ShardClips([srv.file_url(src[1].name), srv.file_url(src[2].name), cut, hang],
                        cfg(frames=3, read_timeout_s=0.5))  # fmt: skip
        t0 = time.monotonic()
        items = list(islice(iter(ds), 4))  # an epoch: the two whole shards' 4 clips
        assert len({i["key"] for i in items}) == 4
        assert max(i["skipped_bad_shard"] for i in items) == 2  # the cut one and the silent one
        assert time.monotonic() - t0 < 20  # 3 tries of 0.5 s, not the server's 30 s
        # one that does not answer at all: the start-up check of --shards gives up as soon
        mute = srv.route("/mute.tar", Route(file=src[0], delay_s=30))
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError, match="no shards at"):
            expand_shards(mute, timeout_s=0.5)
        assert time.monotonic() - t0 < 10

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/run/"
    with pytest.raises(ShardsUnreachable, match="cannot list shards at"):
        expand_shards(dead)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict()))
    assert cli(["train", str(config), "--shards", dead, "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot list shards at" in err[0]
