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


def test_step_inputs_queue_without_a_host_sync():
    """The per-step work around the U-Net -- caption tokens to the GPU, the caption-dropout
    swap, stored latents to the GPU, gradient clipping, the fused AdamW step (skipped on the
    device when the gradients are not finite), the schedule, the EMA update -- must not wait
    for the GPU's queue to drain (each such wait let the GPU idle while the next step was
    being queued)."""
    from hdvg.t2v.config import TextEncoderConfig
    from hdvg.t2v.text import build_text_encoder, encode_prompts
    from hdvg.t2v.train import EMA
    from tests.t2v.conftest import TINY_OPEN_CLIP

    dev = torch.device("cuda")
    enc = build_text_encoder(TextEncoderConfig(max_length=16, random_init=dict(TINY_OPEN_CLIP)))
    enc = enc.to(dev)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(dev)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    latents = torch.randn(2, 4, 4, 8, 8).pin_memory()  # as the loader hands them over
    gen = torch.Generator(dev).manual_seed(0)
    empty = encode_prompts(enc, [""], dev)
    ema.update(model, 1)  # builds its lists (once)
    model(torch.randn(4, 8, device=dev)).sum().backward()
    opt.step()  # the optimizer's state is made in its first step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        text = encode_prompts(enc, ["a red car", "a zoom"], dev)
        drop = torch.rand(2, generator=gen, device=dev) < 0.5
        text = torch.where(drop.view(2, 1, 1), empty, text)
        lat = latents.to(dev, non_blocking=True).float()
        loss = model(torch.randn(4, 8, device=dev, generator=gen)).square().mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        nonfinite = (~torch.isfinite(grad_norm)).float()  # the trainer's skip of a bad step
        opt.found_inf = nonfinite
        opt.step()  # fused AdamW, as the trainer builds it
        skipped_run = torch.zeros((), device=dev)
        skipped_run.add_(1).mul_(nonfinite)
        sched.step()
        ema.update(model, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert text.shape[0] == 2 and lat.shape == (2, 4, 4, 8, 8)
