"""The U-Net: equivalence with diffusers' UNet3DConditionModel, shapes, swap-attention properties."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from hdvg.t2v.config import UNET_PRESETS, UNetConfig, from_dict
from hdvg.t2v.swap import SwapAttention, effective_window, window_merge, window_partition
from hdvg.t2v.unet import Level, SwapUNet
from hdvg.t2v.weights import load_pretrained_unet, modelscope_to_diffusers


def tiny_cfg(**kw) -> UNetConfig:
    return from_dict(UNetConfig, {**UNET_PRESETS["tiny"], **kw})


def tiny_diffusers_unet():
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    ref = UNet3DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_head_dim=16,
        cross_attention_dim=24,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    )
    # diffusers zero-inits the temporal convs' last layer: randomize every all-zero tensor so
    # the comparison exercises those weights too
    with torch.no_grad():
        for p in ref.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return ref.eval()


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet3d")
    tiny_diffusers_unet().save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_loaded_unet_matches_diffusers(diffusers_dir, dtype, tol):
    from diffusers import UNet3DConditionModel

    ref = UNet3DConditionModel.from_pretrained(diffusers_dir).eval().to(dtype)
    model, cfg = load_pretrained_unet(str(diffusers_dir), UNetConfig(swap_window=(4, 4, 4)))
    model = model.eval().to(dtype)
    assert cfg.block_out_channels == (32, 64, 64) and cfg.head_dim == 16
    assert len(model.swap_modules()) > 0  # swap blocks exist, zero-initialized
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 16, 16, generator=g).to(dtype)
    t = torch.tensor([10, 700])
    text = torch.randn(2, 7, 24, generator=g).to(dtype)
    with torch.no_grad():
        want = ref(x, t, text).sample.float()
        got = model(x, t, text).float()
    scale = want.abs().mean()
    assert (got - want).abs().max() / scale < tol


def test_pipeline_dir_and_missing_keys(diffusers_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    for f in diffusers_dir.iterdir():
        (pipe / "unet" / f.name).write_bytes(f.read_bytes())
    model, _ = load_pretrained_unet(str(pipe), UNetConfig())
    assert isinstance(model, SwapUNet)
    sd = load_file(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    sd.pop("conv_in.weight")
    save_file(sd, pipe / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="conv_in.weight"):
        load_pretrained_unet(str(pipe), UNetConfig())
    with pytest.raises(FileNotFoundError):
        load_pretrained_unet(str(tmp_path / "nowhere"), UNetConfig())


def test_modelscope_names_map_onto_the_unet():
    # ModelScope UNetSD names for the tiny layout (input/middle/output blocks, 'temopral_conv')
    ref = tiny_diffusers_unet()
    sd = ref.state_dict()
    inv = {}
    for k, v in sd.items():
        inv[_to_modelscope(k)] = v
    back = modelscope_to_diffusers(inv, layers_per_block=2)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _to_modelscope(k: str) -> str:
    """diffusers -> ModelScope key names, written out independently for the test."""
    import re

    n = 3  # layers_per_block + 1
    rules = [
        (r"^time_embedding\.linear_1\.", "time_embed.0."),
        (r"^time_embedding\.linear_2\.", "time_embed.2."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^transformer_in\.", "input_blocks.0.1."),
        (r"^conv_norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
    ]
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    res = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0."}
    res |= {
        "conv2.": "out_layers.3.",
        "time_emb_proj.": "emb_layers.1.",
        "conv_shortcut.": "skip_connection.",
    }

    def resnet(rest):
        for a, b in res.items():
            if rest.startswith(a):
                return b + rest[len(a) :]
        raise AssertionError(rest)

    if m := re.match(r"down_blocks\.(\d)\.(\w+)\.(\d)\.(.*)", k):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{b * n + n}.op.{rest.removeprefix('conv.')}"
        i = b * n + j + 1
        return {
            "resnets": lambda: f"input_blocks.{i}.0.{resnet(rest)}",
            "temp_convs": lambda: f"input_blocks.{i}.0.temopral_conv.{rest}",
            "attentions": lambda: f"input_blocks.{i}.1.{rest}",
            "temp_attentions": lambda: f"input_blocks.{i}.2.{rest}",
        }[kind]()
    if m := re.match(r"mid_block\.(\w+)\.(\d)\.(.*)", k):
        kind, j, rest = m[1], int(m[2]), m[3]
        return {
            "resnets": lambda: f"middle_block.{3 * j}.{resnet(rest)}",
            "temp_convs": lambda: f"middle_block.{3 * j}.temopral_conv.{rest}",
            "attentions": lambda: f"middle_block.1.{rest}",
            "temp_attentions": lambda: f"middle_block.2.{rest}",
        }[kind]()
    m = re.match(r"up_blocks\.(\d)\.(\w+)\.(\d)\.(.*)", k)
    b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "upsamplers":
        sub = 1 if b == 0 else 3  # after the resnet (no-attention level) or after attn+temp_attn
        return f"output_blocks.{b * n + n - 1}.{sub}.{rest}"
    i = b * n + j
    return {
        "resnets": lambda: f"output_blocks.{i}.0.{resnet(rest)}",
        "temp_convs": lambda: f"output_blocks.{i}.0.temopral_conv.{rest}",
        "attentions": lambda: f"output_blocks.{i}.1.{rest}",
        "temp_attentions": lambda: f"output_blocks.{i}.2.{rest}",
    }[kind]()


def test_shapes_through_every_block():
    cfg = tiny_cfg()
    model = SwapUNet(cfg).eval()
    b, f, h, w = 2, 4, 16, 24  # a 16:9-ish latent grid, not square
    seen = []

    def hook(name):
        def fn(_module, _inputs, out):
            seen.append((name, tuple(out.shape)))

        return fn

    for name, m in model.named_modules():
        if re.search(r"\.(resnets|swaps)\.\d+$|samplers\.0\.conv$", name):
            m.register_forward_hook(hook(name))
    x = torch.randn(b, 4, f, h, w)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 999]), torch.randn(b, 5, cfg.cross_attention_dim))
    assert out.shape == x.shape
    got = dict(seen)
    assert got["down_blocks.0.resnets.0"] == (b * f, 32, 16, 24)
    assert got["down_blocks.1.resnets.0"] == (b * f, 64, 8, 12)
    assert got["down_blocks.2.resnets.0"] == (b * f, 64, 4, 6)
    assert got["mid_block.resnets.1"] == (b * f, 64, 4, 6)
    assert got["mid_block.swaps.0"] == (b * f, 64, 4, 6)
    assert got["up_blocks.0.resnets.1"] == (b * f, 64, 4, 6)
    assert got["up_blocks.2.swaps.1"] == (b * f, 32, 16, 24)
    assert got["up_blocks.1.upsamplers.0.conv"] == (b * f, 64, 16, 24)
    with pytest.raises(ValueError, match="bad input shapes"):
        model(torch.randn(b, 3, f, h, w), 1, torch.randn(b, 5, 32))


def test_window_partition_merge_round_trip():
    x = torch.randn(2 * 8, 6, 12, 20)  # (B*F, C, H, W)
    for window in [(4, 4, 4), (8, 6, 5), (2, 12, 20), (1, 1, 1)]:
        tokens = window_partition(x, 8, window)
        n = (8 // window[0]) * (12 // window[1]) * (20 // window[2])
        assert tokens.shape == (2 * n, window[0] * window[1] * window[2], 6)
        assert torch.equal(window_merge(tokens, 8, 12, 20, window), x)


def test_window_contents_are_local():
    f, h, w = 4, 8, 8
    # each cell holds its own (frame, y, x) coordinates
    coords = torch.stack(
        torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    )
    x = coords.permute(1, 0, 2, 3).float()  # (F, 3, H, W), batch of one video
    tokens = window_partition(x, f, (2, 4, 4))  # (8, 32, 3)
    for win in tokens:
        span = win.max(0).values - win.min(0).values
        assert span.tolist() == [1, 3, 3]  # one 2x4x4 block, contiguous


def test_effective_window_divides():
    assert effective_window(16, 32, 32, (16, 8, 8)) == (16, 8, 8)
    assert effective_window(16, 18, 32, (16, 8, 8)) == (16, 6, 8)  # 144x256 video -> 18 rows
    assert effective_window(8, 4, 7, (16, 8, 8)) == (8, 4, 7)


def test_swap_attention_is_local_in_windows():
    torch.manual_seed(0)
    swap = SwapAttention(16, 8, (2, 4, 4), "spatial")
    torch.nn.init.normal_(swap.attn.to_out[0].weight)  # leave the zero init
    s, t = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)  # one video of 4 frames
    base = swap(s, t, 4)
    t2 = t.clone()
    t2[0:2, :, 0:4, 0:4] += 1.0  # perturb keys/values inside window (0, 0, 0) only
    diff = (swap(s, t2, 4) - base).abs().sum(1)  # (F, H, W)
    assert diff[0:2, 0:4, 0:4].min() > 0
    diff[0:2, 0:4, 0:4] = 0
    assert diff.max() == 0


def test_query_role_alternates_across_the_unet():
    model = SwapUNet(tiny_cfg(layers_per_block=2))
    roles = [m.query for m in model.swap_modules()]
    assert len(roles) == model.num_swap_blocks == 2 * 2 + 1 + 2 * 3
    assert roles == ["spatial", "temporal"] * (len(roles) // 2) + ["spatial"] * (len(roles) % 2)
    other = SwapUNet(tiny_cfg(swap_first_query="temporal"))
    assert other.swap_modules()[0].query == "temporal"
    # an odd block takes its keys/values from the spatial branch
    swap = model.swap_modules()[1]
    assert swap.query == "temporal"
    torch.nn.init.normal_(swap.attn.to_out[0].weight)
    c = swap.norm_q.normalized_shape[0]
    s, t = torch.randn(4, c, 4, 4), torch.randn(4, c, 4, 4)
    kv_only = swap(s, t, 4) - swap(s + 0.1, t, 4)
    assert kv_only.abs().max() > 0


def test_zero_init_swap_is_identity():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    with_swap = SwapUNet(cfg).eval()
    without = SwapUNet(dataclasses.replace(cfg, swap=False)).eval()
    missing = without.load_state_dict(with_swap.state_dict(), strict=False)
    assert not missing.missing_keys and all(".swaps." in k for k in missing.unexpected_keys)
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(with_swap(x, 500, text), without(x, 500, text))
        for m in with_swap.swap_modules():
            torch.nn.init.normal_(m.attn.to_out[0].weight, std=0.1)
        assert not torch.allclose(with_swap(x, 500, text), without(x, 500, text))


@pytest.mark.parametrize(
    "mode,levels", [(True, None), ("attention", None), ("block", None), ("layer", [0])]
)
def test_gradient_checkpointing_same_grads(mode, levels):
    torch.manual_seed(0)
    model = SwapUNet(tiny_cfg(temporal_conv_dropout=0.0)).train()
    for m in model.swap_modules():  # let gradients flow through the swap blocks too
        torch.nn.init.normal_(m.attn.to_out[0].weight, std=0.1)
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 3, 32)
    model(x, 10, text).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_gradient_checkpointing(mode, levels)
    on = [
        m.resolution for m in model.modules() if isinstance(m, Level) and m.gradient_checkpointing
    ]
    assert on and (levels is None or set(on) == set(levels))
    model(x, 10, text).square().mean().backward()
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)
    with pytest.raises(ValueError, match="checkpointing mode"):
        model.set_gradient_checkpointing("everything")


def test_memory_lean_layers_match_plain_ops():
    """The custom-backward norm and GEGLU layers: same values and gradients as the plain ops
    (float64 gradcheck), and under bf16 autocast the same numbers as autocast's own path."""
    import torch.nn.functional as F

    from hdvg.t2v.layers import _GegluFeedForward, group_norm, group_norm_silu, layer_norm

    torch.manual_seed(0)
    gn, ln = torch.nn.GroupNorm(4, 16).double(), torch.nn.LayerNorm(7).double()
    for p in [*gn.parameters(), *ln.parameters()]:
        torch.nn.init.normal_(p)
    x = torch.randn(2, 16, 3, 7, dtype=torch.float64, requires_grad=True)
    for fn, norm in [(group_norm_silu, gn), (group_norm, gn), (layer_norm, ln)]:
        f = lambda x, *_, fn=fn, norm=norm: fn(norm, x)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, *norm.parameters()))
    ff = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 5, 3),
          (12, 3), (12,), (4, 6), (4,))]  # x, proj weight and bias, out weight and bias  # fmt: skip
    assert torch.autograd.gradcheck(_GegluFeedForward.apply, ff)
    gn, ln, xb = gn.float(), ln.float(), x.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(group_norm_silu(gn, xb), F.silu(gn(xb)))
        assert torch.equal(layer_norm(ln, xb), ln(xb))


def test_norm_cuda_autocast_policy_matches_plain_ops():
    """The norm as CUDA autocast runs it (fp32 compute, bf16 in and out), here on CPU tensors:
    bit-equal to the plain fp32 ops and casts, for a strided input and for an output written
    in a consumer's layout (``perm``), values and gradients."""
    import torch.nn.functional as F

    from hdvg.t2v.layers import _Norm

    torch.manual_seed(0)
    gn, ln = torch.nn.GroupNorm(4, 16), torch.nn.LayerNorm(16)
    for p in [*gn.parameters(), *ln.parameters()]:
        torch.nn.init.normal_(p)
    x0 = torch.randn(2, 3, 16, 5, 7).bfloat16().permute(0, 2, 1, 3, 4)  # (2, 16, 3, 5, 7)

    def plain(x, w, b):
        if w.shape[0] == x.shape[1]:
            return F.group_norm(x.float(), 4, w, b, gn.eps)
        return F.layer_norm(x.float(), [16], w, b, ln.eps)

    cases = [(gn, silu, perm) for silu in (False, True) for perm in (None, (0, 3, 4, 2, 1))]
    for norm, silu, perm in [*cases, (ln, False, None)]:
        spec = ("group", 2, 16, 3 * 5 * 7, 4, gn.eps) if norm is gn else ("layer", [16], ln.eps)
        x = x0 if norm is gn else x0.transpose(1, -1)  # layer norm: C last, strided
        leaves = [t.detach().clone().requires_grad_() for t in (x, norm.weight, norm.bias)]
        got = _Norm.apply(*leaves, spec, silu, torch.float32, torch.bfloat16, perm)
        ref = [t.detach().clone().requires_grad_() for t in leaves]
        y = plain(*ref)
        want = (F.silu(y) if silu else y).bfloat16()
        g = torch.randn_like(want)
        got.backward(g)
        want.backward(g)
        assert torch.equal(got, want)
        if perm:
            assert got.permute(perm).is_contiguous()
        for a, b in zip(leaves, ref, strict=True):
            assert torch.equal(a.grad, b.grad)


def test_norms_hand_aten_contiguous_inputs_outside_autocast(monkeypatch):
    """CUDA's group norm kernels refuse strided inputs ("Expected X.is_contiguous"), which the
    CPU's accept: a whole tiny U-Net forward + backward in fp32 with no autocast (as the GPU
    tests and ``bench_attention.py`` run it, where it failed on an H100) hands every aten norm
    call a contiguous input and gradient -- the temporal transformers' norms get permuted views."""
    from hdvg.t2v import layers

    seen = []

    class StrictAten:  # the aten ops layers calls, checked as CUDA checks them
        def __getattr__(self, name):
            op = getattr(torch.ops.aten, name)
            if "norm" not in name:
                return op

            def checked(*args, **kwargs):
                dense = [a.is_contiguous() for a in args[:2] if isinstance(a, torch.Tensor)]
                seen.append((name, all(dense)))
                return op(*args, **kwargs)

            return checked

    monkeypatch.setattr(layers, "aten", StrictAten())
    model = _lively_tiny_unet()
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)
    model(x, 10, text).square().mean().backward()
    kinds = {name for name, _ in seen}
    assert {"native_group_norm", "native_group_norm_backward"} <= kinds
    assert {"native_layer_norm", "native_layer_norm_backward"} <= kinds
    assert all(ok for _, ok in seen), sorted({name for name, ok in seen if not ok})


def test_separate_qkv_weights_fuse_on_load():
    """Checkpoints with diffusers' separate to_q/to_k/to_v load into the fused projections."""
    model = SwapUNet(tiny_cfg())
    sd = model.state_dict()
    split = {}
    for k, v in sd.items():
        if k.endswith("to_qkv.weight"):
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3), strict=True):
                split[k.replace("to_qkv", name)] = part.clone()
        elif k.endswith("to_kv.weight"):
            for name, part in zip(("to_k", "to_v"), v.chunk(2), strict=True):
                split[k.replace("to_kv", name)] = part.clone()
        else:
            split[k] = v
    other = SwapUNet(tiny_cfg())
    other.load_state_dict(split, strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(sd.values(), other.state_dict().values(), strict=True)
    )


def _lively_tiny_unet() -> SwapUNet:
    """Tiny U-Net whose zero-initialized branches (swap output, last temporal conv) are not
    zero, so that every path carries values and gradients."""
    torch.manual_seed(0)
    model = SwapUNet(tiny_cfg(temporal_conv_dropout=0.0)).train()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv3d, SwapAttention)):
            for p in m.parameters():
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.1)
    return model


def test_channels_last_matches_nchw():
    """NHWC weights and input (the temporal convs then run as (3,1) Conv2d): same output and
    gradients as the NCHW model, and the output comes back NHWC-laid-out."""
    from hdvg.t2v.unet import channels_last_input, to_channels_last

    model = _lively_tiny_unet()
    x, text = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 3, 32)
    want = model(x, 10, text)
    want.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    to_channels_last(model)
    x_cl = channels_last_input(x)  # (B, C, F, H, W)
    got = model(x_cl, 10, text)
    got.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.permute(0, 2, 3, 4, 1).is_contiguous()  # (b f h w c) in memory
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_compiled_blocks_match_eager():
    """Inside torch.compile the norms and GEGLU take plain ops (inductor fuses them): one block
    of each kind, compiled (aot_eager: the same graph capture and autograd split as inductor,
    without code generation), gives eager's values and gradients; ``compile_regions`` compiles
    every block of those kinds in place."""
    from hdvg.t2v.unet import REGION_TYPES, compile_regions

    model = _lively_tiny_unet()
    level = model.down_blocks[0]
    blocks = [level.resnets[0], level.temp_convs[0], level.attentions[0], level.swaps[0]]
    x = torch.randn(4, 32, 8, 8)  # (B*F, C, H, W): one video of 4 frames
    args = [(x, torch.randn(1, 128), 4), (x, 4), (x, torch.randn(4, 3, 32)), (x, x.flip(0), 4)]
    for block, a in zip(blocks, args, strict=True):
        want = block(*a)
        want.square().mean().backward()
        ref = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        got = torch.compile(block, backend="aot_eager", dynamic=False)(*a)
        got.square().mean().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, p in zip(ref, block.parameters(), strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    n = compile_regions(model, backend="aot_eager")
    assert n == sum(isinstance(m, REGION_TYPES) for m in model.modules()) > 0


def test_compiled_norms_match_eager(capfd):
    """``compile_norms``: the whole U-Net's norms through one compiled function (aot_eager
    here) give eager's values and gradients, NCHW and channels-last; every variant of the
    function compiles (past dynamo's default limit of 8 the rest ran eager, with one log line)."""
    from hdvg.t2v.layers import compile_norms
    from hdvg.t2v.unet import channels_last_input, to_channels_last

    model = _lively_tiny_unet()
    x, text = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 3, 32)
    want = model(x, 10, text)
    want.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    to_channels_last(model)
    x_cl = channels_last_input(x)
    compile_norms(backend="aot_eager")
    try:
        for inp in (x, x_cl):
            model.zero_grad()
            got = model(inp, 10, text)
            got.square().mean().backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for a, p in zip(ref, model.parameters(), strict=True):
                torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    finally:
        compile_norms(False)
    assert "recompile_limit" not in capfd.readouterr().err


def test_attention_backends_per_kind(monkeypatch):
    """Every Attention knows its kind, and ``use_attention_backends`` restricts SDPA for the
    calls of the kinds it names only: here the temporal ones to the math backend."""
    import collections

    import torch.nn.functional as F

    from hdvg.t2v.layers import (
        Attention,
        SpatialTransformer,
        TemporalTransformer,
        use_attention_backends,
    )

    torch.manual_seed(0)
    model = SwapUNet(tiny_cfg()).eval()
    n = collections.Counter(type(m).__name__ for m in model.modules())
    kinds = collections.Counter(m.kind for m in model.modules() if isinstance(m, Attention))
    assert n[SpatialTransformer.__name__] and n[TemporalTransformer.__name__]
    assert kinds == {
        "spatial": n["SpatialTransformer"],
        "cross": n["SpatialTransformer"],
        "temporal": 2 * n["TemporalTransformer"],  # its attn2 is self-attention too
        "swap": n["SwapAttention"],
    }
    x, t, text = torch.randn(1, 4, 2, 8, 8), torch.tensor([10]), torch.randn(1, 3, 32)
    with torch.no_grad():
        want = model(x, t, text)
    seen = []  # (kind, flash enabled, math enabled) per SDPA call, in order
    for m in model.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(lambda m, *_: seen.append([m.kind]))
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen[-1] += [
            torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(),
        ]
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    use_attention_backends({"temporal": "math"})
    try:
        with torch.no_grad():
            got = model(x, t, text)
    finally:
        use_attention_backends()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(seen) == sum(kinds.values())
    for kind, flash, math in seen:
        assert (flash, math) == ((False, True) if kind == "temporal" else (True, True)), kind
    with pytest.raises(ValueError, match="attention backend"):
        use_attention_backends({"temporal": "fast"})
    with pytest.raises(ValueError, match="attention kind"):
        use_attention_backends({"windows": "math"})


def test_cached_casts_reuse_a_cast_until_the_weight_changes():
    from hdvg.t2v.layers import cached_casts, cast_weight

    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.no_grad():
        assert cast_weight(w, torch.bfloat16) is not cast_weight(w, torch.bfloat16)  # no cache
        with cached_casts():
            a = cast_weight(w, torch.bfloat16)
            assert cast_weight(w, torch.bfloat16) is a and a.dtype == torch.bfloat16
            w.add_(1.0)  # an optimizer step, say: the cast is stale
            b = cast_weight(w, torch.bfloat16)
            assert b is not a and torch.equal(b, w.to(torch.bfloat16))
        assert cast_weight(w, torch.bfloat16) is not b  # the cache closed with its context
    with cached_casts():  # with grad on, a cast is part of the graph: never reused
        c = cast_weight(w, torch.bfloat16)
        assert c.requires_grad and cast_weight(w, torch.bfloat16) is not c
