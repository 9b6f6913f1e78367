"""Model stages on a CUDA GPU (skipped without one): bf16 batched captions and fp16 CLIP."""

from __future__ import annotations

import pytest

from hdvg import media
from hdvg.config import ModelsConfig
from hdvg.media import VideoSpec
from hdvg.records import Clip
from hdvg.stages import build_stage
from hdvg.stages.models import testing as T

pytestmark = pytest.mark.gpu


def _clips(tmp_path, n):
    data = media.make_video(tmp_path / "c.mp4", VideoSpec(640, 360, 25, (2.0,))).read_bytes()
    return [Clip(f"s{i}_0000", f"s{i}", "u", 0, 0, 2, 0, 50, 2, 640, 360, 25.0, data=data)
            for i in range(n)]  # fmt: skip


def test_caption_bf16_on_gpu(tmp_path):
    import torch

    st = build_stage("caption", {"path": str(T.save_tiny_blip2(tmp_path / "b2")),
                                 "batch_size": 4, "min_new_tokens": 3})  # fmt: skip
    st.bind(ModelsConfig(device="cuda"))
    st.setup()
    assert st.device.type == "cuda" and st.dtype == torch.bfloat16
    clips = _clips(tmp_path, 6)
    st.process_batch(clips, [None] * 6)
    assert all(c.caption for c in clips)


@pytest.mark.parametrize("compile_with", ["cudagraphs", "inductor"])
def test_static_cache_compiled_decode_step_on_gpu(tmp_path, compile_with):
    # caption.cache: static on CUDA compiles the decode step once (caption.static_compile).
    # cudagraphs replays the eager kernels: the captions of the same static cache with the
    # compile switched off, token for token. inductor generates its own kernels (other
    # rounding in bf16): captions, one compile
    import torch

    path = str(T.save_tiny_blip2(tmp_path / "b2"))
    params = {"path": path, "batch_size": 4, "min_new_tokens": 6, "max_new_tokens": 6,
              "cache": "static", "static_compile": compile_with}  # fmt: skip
    stages = []
    for _ in range(2):
        st = build_stage("caption", params)
        st.bind(ModelsConfig(device="cuda"))
        st.setup()
        stages.append(st)
    eager_kwargs = stages[0].generate_kwargs
    stages[0].generate_kwargs = lambda: {**eager_kwargs(), "disable_compile": True}
    a, b = _clips(tmp_path, 6), _clips(tmp_path, 6)  # batches of 4 and 2 (padded to 4)
    stages[0].process_batch(a, [None] * 6)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    stages[1].process_batch(b, [None] * 6)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step ran compiled
    assert all(c.caption for c in b)
    if compile_with == "cudagraphs":
        assert [c.caption for c in b] == [c.caption for c in a]


def test_clip_score_on_gpu(tmp_path):
    st = build_stage("clip_score", {"path": str(T.save_tiny_open_clip(tmp_path / "oc")),
                                    "min_score": None})  # fmt: skip
    st.bind(ModelsConfig(device="cuda"))
    st.setup()
    clips = _clips(tmp_path, 3)
    for c in clips:
        c.caption = "a dog"
    st.process_batch(clips, [None] * 3)
    assert all(isinstance(c.scores["clip_score"], float) for c in clips)
