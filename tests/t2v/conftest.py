"""Fixtures for the t2v tests: tiny hdvg shards made with ffmpeg at test time, and tiny models
(random weights, real configs and loaders) saved to temporary dirs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

torch = pytest.importorskip("torch")
# tiny models are op-overhead bound: one thread is much faster than two fighting over 2 cores
torch.set_num_threads(1)

# lavfi sources with different content and motion; (source, width, height, frames, fps)
CLIPS = [
    (
        "testsrc2=size={w}x{h}:rate={fps}",
        96,
        64,
        24,
        12,
        "a colourful test pattern with a moving counter",
    ),
    ("mandelbrot=size={w}x{h}:rate={fps}", 64, 64, 20, 10, "a zoom into the mandelbrot set"),
    ("color=c=red:size={w}x{h}:rate={fps}", 128, 72, 16, 8, ""),  # no captioner ran
    ("testsrc=size={w}x{h}:rate={fps}", 256, 144, 30, 15, "a test card with a sweeping gradient"),
    ("rgbtestsrc=size={w}x{h}:rate={fps}", 80, 64, 18, 9, "red green and blue bars"),
    ("smptebars=size={w}x{h}:rate={fps}", 96, 64, 8, 8, "smpte colour bars, too short to train on"),
]


def _encode(lavfi: str, frames: int, out: Path) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # absent on a bare GPU image

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", lavfi, "-frames:v", str(frames)]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-bf", "0", str(out)]
    subprocess.run(cmd, check=True, timeout=60, stdin=subprocess.DEVNULL)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_shards(out_dir: Path, n: int, per_shard: int = 2) -> list[Path]:
    """Write ``n`` clips as hdvg WebDataset shards ``out_dir/shards/shard-NNNNNN.tar``.

    Swap this for a real ``hdvg curate`` output: the dataset only needs the shard layout.
    """
    shards = Path(out_dir) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    media = Path(out_dir) / "media"
    media.mkdir(exist_ok=True)
    samples = []
    for i in range(n):
        src, w, h, frames, fps, caption = CLIPS[i % len(CLIPS)]
        key = f"{i:016x}_{i % 7:04d}"
        mp4 = media / f"{key}.mp4"
        _encode(src.format(w=w, h=h, fps=fps), frames, mp4)
        row = {"clip_id": key, "width": w, "height": h, "fps": float(fps)}
        row |= {"duration_s": frames / fps, "status": "accepted", "caption": caption}
        samples.append((key, mp4.read_bytes(), caption, row))
    paths = []
    for s in range(0, n, per_shard):
        path = shards / f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, video, caption, row in samples[s : s + per_shard]:
                _add(tar, f"{key}.json", json.dumps(row, sort_keys=True).encode())
                _add(tar, f"{key}.mp4", video)
                _add(tar, f"{key}.txt", caption.encode())
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hdvg_out")
    make_shards(root, 6)
    return root


@contextlib.contextmanager
def training_run(cmd: list[str], env: dict[str, str], run: Path, rows: int = 2):
    """`cmd` (a training launch) in its own process group, yielded once RUN/metrics.jsonl has
    `rows` rows; the group is SIGKILLed on the way out if still alive (a failed test leaves
    no trainer behind)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
                break
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- tiny models -------------------------------------------------------------------------------

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
}

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_config_dict(**sections) -> dict:
    """A tiny CPU config (the shape of pipelines/t2v-tiny.yaml) with section overrides."""
    cfg = {
        "model": {"preset": "tiny"},
        "text_encoder": {
            "kind": "open_clip",
            "max_length": 16,
            "random_init": dict(TINY_OPEN_CLIP),
        },
        "vae": {"random_init": dict(TINY_VAE)},
        "data": {"frames": 4, "size": [32, 32], "fps": 4.0, "batch_size": 2, "num_workers": 0},
        "train": {
            "steps": 4,
            "lr": 1e-3,
            "warmup_steps": 2,
            "ema_decay": 0.9,
            "precision": "fp32",
            "ckpt_every": 2,
            "seed": 0,
        },
        "sample": {"steps": 3, "guidance": 3.0, "fps": 4.0},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_tiny_clip(path: Path) -> Path:
    """A tiny transformers CLIPTextModel + CLIPTokenizer (byte-level vocab, no merges)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # GPT-2 / CLIP byte -> unicode map: printable bytes map to themselves, the rest shift up
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": i + len(chars) for i, c in enumerate(chars)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok_dir = path / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")).save_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(cfg).save_pretrained(path / "text_encoder")
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vae") / "vae"
    AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return path.parent


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
