"""Frozen text encoders: prompts -> token embeddings ``(B, L, D)`` for the U-Net's cross-attention.

- ``open_clip``: the OpenCLIP text tower read at its penultimate layer, then ``ln_final`` --
  what SD-2.x (``FrozenOpenCLIPEmbedder(layer="penultimate")``) and ModelScope-T2V feed their
  U-Nets (ViT-H-14, width 1024). The tokenizer ships inside open_clip, so nothing is fetched.
- ``clip``: a transformers ``CLIPTextModel`` + ``CLIPTokenizer`` from a local dir (e.g. a
  diffusers pipeline's ``text_encoder/`` and ``tokenizer/``; ModelScope's diffusers port keeps
  23 layers there, so ``layer: last`` already is the penultimate layer of ViT-H).

Weights come from a local path or the local HF cache (``local_files_only``); ``random_init``
builds a tiny tower from a config for tests and CPU smoke runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hdvg.t2v.config import ConfigError, TextEncoderConfig


def _local_dir(path: str | None, name: str | None) -> Path | None:
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"text encoder weights not found at {p}")
        return p
    if name:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            return None
    return None


class OpenCLIPText(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower

        self.layer = cfg.layer
        if cfg.random_init is not None:
            spec = dict(cfg.random_init)
            torch.manual_seed(int(spec.pop("seed", 0)))
            self.tower = _build_text_tower(spec.get("embed_dim", 64), spec["text_cfg"])
        else:
            model_cfg, weights = self._find(cfg)
            self.tower = _build_text_tower(model_cfg["embed_dim"], model_cfg["text_cfg"])
            sd = _read_weights(weights)
            sd = {
                k.removeprefix("text."): v
                for k, v in sd.items()
                if not k.startswith("visual.") and not k.startswith("logit_")
            }
            res = self.tower.load_state_dict(sd, strict=False)
            if res.missing_keys:
                raise ConfigError(f"{weights}: text tower keys missing: {res.missing_keys[:8]}")
        ctx = self.tower.positional_embedding.shape[0]
        self.max_length = min(cfg.max_length, ctx)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.max_length)
        self.dim = self.tower.transformer.width

    @staticmethod
    def _find(cfg: TextEncoderConfig) -> tuple[dict[str, Any], Path]:
        import open_clip

        p = _local_dir(cfg.path, cfg.name if "/" in cfg.name else None)
        if p is not None and p.is_dir():  # HF hub layout: open_clip_config.json + weights
            model_cfg = json.loads((p / "open_clip_config.json").read_text())["model_cfg"]
            for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                if (p / f).exists():
                    return model_cfg, p / f
            raise FileNotFoundError(f"no open_clip weights in {p}")
        if p is not None:  # a weights file for the builtin config `name`
            model_cfg = open_clip.get_model_config(cfg.name)
            if model_cfg is None:
                raise ConfigError(f"unknown open_clip model name {cfg.name!r}")
            return model_cfg, p
        raise FileNotFoundError(
            f"OpenCLIP text encoder {cfg.name!r}: set text_encoder.path to a local weights file "
            "or an HF-layout dir (nothing is downloaded)"
        )

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)  # (B, L) int64

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.tower
        x = t.token_embedding(tokens) + t.positional_embedding[: tokens.shape[1]]  # (B, L, D)
        mask = (
            t.attn_mask[: tokens.shape[1], : tokens.shape[1]] if t.attn_mask is not None else None
        )
        blocks = t.transformer.resblocks
        if self.layer == "penultimate":
            blocks = blocks[:-1]
        for block in blocks:
            x = block(x, attn_mask=mask)  # batch-first (open_clip >= 2.24)
        return t.ln_final(x)  # (B, L, D)


class HFCLIPText(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        p = _local_dir(cfg.path, cfg.name)
        if p is None:
            raise FileNotFoundError(f"CLIP text encoder {cfg.name!r} not found locally")
        enc_dir = p / "text_encoder" if (p / "text_encoder").is_dir() else p
        tok_dir = p / "tokenizer" if (p / "tokenizer").is_dir() else p
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True)
        self.layer = cfg.layer
        self.max_length = min(cfg.max_length, self.model.config.max_position_embeddings)
        self.dim = self.model.config.hidden_size

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.layer == "last":
            return self.model(tokens).last_hidden_state  # (B, L, D)
        out = self.model(tokens, output_hidden_states=True)
        inner = getattr(self.model, "text_model", self.model)  # transformers < 5 nests it
        return inner.final_layer_norm(out.hidden_states[-2])


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


TEXT_ENCODERS: dict[str, type[nn.Module]] = {"open_clip": OpenCLIPText, "clip": HFCLIPText}


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.kind not in TEXT_ENCODERS:
        raise ConfigError(f"unknown text_encoder.kind {cfg.kind!r}; known: {sorted(TEXT_ENCODERS)}")
    if cfg.layer not in ("penultimate", "last"):
        raise ConfigError("text_encoder.layer must be 'penultimate' or 'last'")
    enc = TEXT_ENCODERS[cfg.kind](cfg)
    enc.requires_grad_(False)
    return enc.eval()


@torch.no_grad()
def encode_prompts(encoder: nn.Module, prompts: list[str], device: torch.device) -> torch.Tensor:
    tokens = encoder.tokenize(list(prompts))  # (B, L) on the host
    if device.type == "cuda":  # a plain copy waits for the GPU's queue to drain first
        tokens = tokens.pin_memory()
    return encoder(tokens.to(device, non_blocking=True))  # (B, L, D)
