"""GPU checks (skipped without CUDA): bf16 equivalence on the device, a short bf16 training run."""

from __future__ import annotations

import json

import pytest
import torch

from hdvg.t2v.config import UNetConfig
from hdvg.t2v.weights import load_pretrained_unet

pytestmark = pytest.mark.gpu


def test_bf16_cuda_matches_diffusers(tmp_path):
    from tests.t2v.test_model import tiny_diffusers_unet

    ref = tiny_diffusers_unet()
    ref.save_pretrained(tmp_path)
    model, _ = load_pretrained_unet(str(tmp_path), UNetConfig())
    ref, model = ref.cuda().eval(), model.cuda().eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 32, 32, generator=g), torch.randn(2, 77, 24, generator=g)
    x, text, t = x.cuda(), text.cuda(), torch.tensor([3, 900]).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = ref(x, t, text).sample.float()
        got = model(x, t, text).float()
    assert (got - want).abs().max() / want.abs().mean() < 5e-2


def test_short_bf16_training_run(shard_root, tmp_path):
    from hdvg.t2v.train import main
    from tests.t2v.test_train_sample import micro_cfg

    cfg = micro_cfg(steps=3, precision="bf16", ckpt_every=3)
    assert main(cfg, str(shard_root), tmp_path) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["gpu_mem_gib"] > 0 for r in rows)


def test_channels_last_bf16_cuda_matches_nchw():
    """The NHWC path on the device (cuDNN NHWC convs, temporal convs as (3,1) Conv2d) under
    bf16 autocast: the NCHW model's output within bf16 rounding. (The output's layout is
    not asserted: on CUDA the group norms take contiguous NCHW input, and the H100 run of
    2026-11-26 gave an NCHW output; the layout is cuDNN's choice, the values are ours.)"""
    from hdvg.t2v.unet import channels_last_input, to_channels_last
    from tests.t2v.test_model import _lively_tiny_unet

    model = _lively_tiny_unet().cuda()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    x, text, t = x.cuda(), text.cuda(), torch.tensor([3, 900]).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(x, t, text).float()
        to_channels_last(model)
        got = model(channels_last_input(x), t, text)
    assert (got.float() - want).abs().max() / want.abs().mean() < 5e-2


def test_triton_kernels_bf16_cuda_match_aten():
    """``train.kernels: triton`` on the device under bf16 autocast: the aten model's output
    and gradients within bf16 rounding (both compute the norms in fp32; the kernels' sums
    run in another order)."""
    from hdvg.t2v.layers import use_kernels
    from tests.t2v.test_model import _lively_tiny_unet

    model = _lively_tiny_unet().cuda()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    x, text, t = x.cuda(), text.cuda(), torch.tensor([3, 900]).cuda()
    runs = []
    for kind in ("aten", "triton"):
        use_kernels(kind)
        model.zero_grad()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, t, text)
            out.float().square().mean().backward()
        finally:
            use_kernels("aten")
        runs.append((out.float(), [p.grad.float().clone() for p in model.parameters()]))
    (want, ref), (got, grads) = runs
    assert (got - want).abs().max() / want.abs().mean() < 5e-2
    for a, b in zip(ref, grads, strict=True):
        assert (a - b).norm() <= 5e-2 * a.norm() + 1e-6
