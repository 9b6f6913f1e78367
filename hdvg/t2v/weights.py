"""Load public U-Net weights (diffusers ``UNet3DConditionModel`` or ModelScope ``UNetSD``) onto
the hdvg ``SwapUNet``. Everything new (the ``swaps.*`` modules) keeps its zero init, so the
loaded model computes exactly what the base model computes.

Nothing is downloaded: a path must exist locally; a name is looked up in the local Hugging
Face cache only (``local_files_only=True``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hdvg.t2v.config import ConfigError, UNetConfig
from hdvg.t2v.unet import SwapUNet

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def _resolve_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        try:  # a repo id already in the local HF cache
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(path, local_files_only=True))
        except Exception as e:
            raise FileNotFoundError(
                f"U-Net weights not found: {path!r} is neither a local path nor in the HF cache"
            ) from e
    if p.is_dir() and (p / "unet" / "config.json").exists():  # a pipeline dir
        p = p / "unet"
    return p


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def unet_config_from_diffusers(cfg: dict[str, Any], base: UNetConfig) -> UNetConfig:
    """Layout fields from a diffusers ``UNet3DConditionModel`` config; swap settings from ``base``."""
    if cfg.get("_class_name", "UNet3DConditionModel") != "UNet3DConditionModel":
        raise ConfigError(f"expected a UNet3DConditionModel checkpoint, got {cfg['_class_name']}")
    head_dim = cfg.get("attention_head_dim", 64)
    if not isinstance(head_dim, int):
        raise ConfigError("per-level attention_head_dim is not supported")
    down = cfg.get("down_block_types", ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"])
    up = cfg.get("up_block_types", ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3)
    levels = tuple("CrossAttn" in t for t in down)
    if levels != tuple("CrossAttn" in t for t in reversed(up)):
        raise ConfigError("up_block_types must mirror down_block_types")
    # diffusers' blocks build Transformer2DModel(C // attention_head_dim heads, attention_head_dim):
    # the config key is, despite diffusers' naming note, the per-head width here.
    return replace(
        base,
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
        attention_levels=levels,
        layers_per_block=cfg.get("layers_per_block", 2),
        head_dim=head_dim,
        cross_attention_dim=cfg.get("cross_attention_dim", 1024),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        in_temporal_heads=8,
    )


_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
)


def _map_resnet(prefix: str, temp_prefix: str, rest: str) -> str:
    if rest.startswith("temopral_conv."):  # sic: ModelScope's spelling
        return temp_prefix + rest[len("temopral_conv.") :]
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return prefix + new + rest[len(old) :]
    return prefix + rest


def modelscope_to_diffusers(
    sd: dict[str, torch.Tensor], layers_per_block: int
) -> dict[str, torch.Tensor]:
    """Rename a ModelScope ``UNetSD`` state dict to diffusers' ``UNet3DConditionModel`` names
    (the mapping of diffusers' ``scripts/convert_ms_text_to_video_to_diffusers.py``)."""
    n = layers_per_block + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.removeprefix("model.diffusion_model.")
        new = None
        fixed = {
            "time_embed.0.": "time_embedding.linear_1.",
            "time_embed.2.": "time_embedding.linear_2.",
            "input_blocks.0.0.": "conv_in.",
            "input_blocks.0.1.": "transformer_in.",
            "out.0.": "conv_norm_out.",
            "out.2.": "conv_out.",
        }
        for old, rep in fixed.items():
            if k.startswith(old):
                new = rep + k[len(old) :]
        if new is None and (m := re.match(r"input_blocks\.(\d+)\.(.*)", k)):
            i, rest = int(m[1]), m[2]
            b, j = (i - 1) // n, (i - 1) % n
            base = f"down_blocks.{b}."
            if rest.startswith("op."):
                new = base + "downsamplers.0.conv." + rest[3:]
            elif rest.startswith("0."):
                new = _map_resnet(f"{base}resnets.{j}.", f"{base}temp_convs.{j}.", rest[2:])
            elif rest.startswith("1."):
                new = f"{base}attentions.{j}." + rest[2:]
            elif rest.startswith("2."):
                new = f"{base}temp_attentions.{j}." + rest[2:]
        elif new is None and (m := re.match(r"middle_block\.(\d)\.(.*)", k)):
            idx, rest = int(m[1]), m[2]
            r = {0: 0, 3: 1}.get(idx)
            if r is not None:
                new = _map_resnet(f"mid_block.resnets.{r}.", f"mid_block.temp_convs.{r}.", rest)
            else:
                new = (
                    "mid_block.attentions.0." if idx == 1 else "mid_block.temp_attentions.0."
                ) + rest
        elif new is None and (m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", k)):
            i, sub, rest = int(m[1]), int(m[2]), m[3]
            b, j = i // n, i % n
            base = f"up_blocks.{b}."
            if sub == 0:
                new = _map_resnet(f"{base}resnets.{j}.", f"{base}temp_convs.{j}.", rest)
            elif rest.startswith("conv."):
                new = base + "upsamplers.0." + rest
            else:
                new = base + ("attentions" if sub == 1 else "temp_attentions") + f".{j}." + rest
        if new is None:
            raise ConfigError(f"unrecognized ModelScope key {key!r}")
        if re.search(r"proj_(in|out)\.weight$", new) and value.ndim > 2:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv == linear
        out[new] = value
    return out


def load_pretrained_unet(path: str, base: UNetConfig) -> tuple[SwapUNet, UNetConfig]:
    """Build a ``SwapUNet`` from a diffusers dir / pipeline dir / HF cache name, or a ModelScope
    ``.pth``; returns it with its resolved config. Raises on any key that does not fit."""
    p = _resolve_dir(path)
    if p.is_dir():
        cfg = unet_config_from_diffusers(json.loads((p / "config.json").read_text()), base)
        files = [p / f for f in WEIGHT_FILES if (p / f).exists()]
        if not files:
            raise FileNotFoundError(f"no diffusers weight file in {p} (looked for {WEIGHT_FILES})")
        sd = read_state_dict(files[0])
    else:  # ModelScope text2video_pytorch_model.pth: the default (1.7B) layout
        cfg = base
        sd = modelscope_to_diffusers(read_state_dict(p), cfg.layers_per_block)
    model = SwapUNet(cfg)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if ".swaps." not in k]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"checkpoint {p} does not fit the U-Net: missing {missing[:8]} (of {len(missing)}), "
            f"unexpected {result.unexpected_keys[:8]} (of {len(result.unexpected_keys)})"
        )
    return model, cfg
