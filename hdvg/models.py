"""Model weights: where each model stage looks for them, loading them once per process,
and the `hdvg models` command.

Three kinds of weights:
- Hugging Face models (BLIP-2, BLIP): `model: Salesforce/blip2-opt-2.7b` is looked up in
  the local HF cache only (`models.cache_dir`, default $HF_HUB_CACHE), unless
  `models.allow_download`; `path: /dir` points at a `save_pretrained` folder instead.
- open_clip backbones: `model: ViT-L-14` + `pretrained: openai` (the HF cache entry
  open_clip itself would use), or `path:` an open_clip `local-dir` (open_clip_config.json +
  open_clip_pytorch_model.bin) or a checkpoint file for the `model:` architecture.
- small heads on CLIP embeddings (aesthetic, watermark): a `.pth` file given as an absolute
  path or relative to the weights folder ($HDVG_WEIGHTS, default ~/.cache/hdvg/weights).

A run records `name@revision` with every caption and score: the HF commit for cache
entries, else a short hash of the files' names and sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelsConfig


class ModelNotFoundError(ConfigError):
    """A stage's weights are not where it looked (and downloads are not allowed)."""


@dataclass
class WeightRef:
    """What a stage will load and where it looked."""

    stage: str
    kind: str  # "hf" | "open_clip" | "head"
    model: str  # a name for people: HF repo, open_clip arch/tag, head file
    where: str  # where it looks
    found: bool
    resolved: str | None = None  # local dir / file to load; None: download at load time
    revision: str | None = None
    hint: str = ""  # which setting points elsewhere

    @property
    def label(self) -> str:
        return f"{self.model}@{self.revision or 'unknown'}"

    def error(self) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"stage {self.stage}: model {self.model} not found in {self.where} ({self.hint})"
        )


def weights_dir() -> Path:
    return Path(os.environ.get("HDVG_WEIGHTS", Path.home() / ".cache" / "hdvg" / "weights"))


def hf_cache(models: ModelsConfig) -> str:
    if models.cache_dir:
        return str(models.cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def local_revision(path: Path) -> str:
    """A cheap, stable fingerprint of a local model folder or file (names + sizes)."""
    if path.parent.name == "snapshots":  # inside an HF cache: the folder name is the commit
        return path.name
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size};".encode())
    return "local-" + h.hexdigest()[:12]


def resolve_hf(stage: str, model: str, revision: str | None, path: str | None,
               models: ModelsConfig) -> WeightRef:  # fmt: skip
    if path:
        p = Path(path).expanduser()
        found = (p / "config.json").is_file()
        return WeightRef(stage, "hf", model, str(p), found, str(p) if found else None,
                         revision or (local_revision(p) if found else None),
                         f"set clip_stages.{stage}.path to a save_pretrained folder")  # fmt: skip
    cache = hf_cache(models)
    hint = f"set clip_stages.{stage}.path or models.allow_download"
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(model, revision=revision, cache_dir=cache, local_files_only=True)
        return WeightRef(stage, "hf", model, cache, True, snap, Path(snap).name, hint)
    except Exception:  # noqa: BLE001 - any lookup failure means: not in the cache
        if models.allow_download:
            return WeightRef(stage, "hf", model, f"{cache} (download allowed)", True, None,
                             revision, hint)  # fmt: skip
        return WeightRef(stage, "hf", model, cache, False, None, revision, hint)


def resolve_open_clip(stage: str, arch: str, pretrained: str | None, path: str | None,
                      models: ModelsConfig) -> WeightRef:  # fmt: skip
    if path:
        p = Path(path).expanduser()
        found = (p / "open_clip_config.json").is_file() if p.is_dir() else p.is_file()
        name = p.name if p.is_dir() or not p.exists() else arch
        return WeightRef(stage, "open_clip", name, str(p), found, str(p) if found else None,
                         local_revision(p) if found else None,
                         f"set clip_stages.{stage}.path to an open_clip folder or checkpoint")  # fmt: skip
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, pretrained or "") or {}
    hub = (cfg.get("hf_hub") or "").strip("/")
    name = f"{arch}/{pretrained}"
    if not hub:
        return WeightRef(stage, "open_clip", name, "open_clip's pretrained list", False, None,
                         None, f"unknown open_clip pretrained tag; set clip_stages.{stage}.path")  # fmt: skip
    ref = resolve_hf(stage, hub, None, None, models)
    ref.kind, ref.model = "open_clip", name
    ref.revision = f"{hub}@{ref.revision}" if ref.revision else hub
    return ref


def resolve_head(stage: str, head: str) -> WeightRef:
    p = Path(head).expanduser()
    if not p.is_absolute():
        p = weights_dir() / p
    found = p.is_file()
    return WeightRef(stage, "head", p.name, str(p.parent), found, str(p) if found else None,
                     local_revision(p) if found else None,
                     f"set clip_stages.{stage}.head or put the file in $HDVG_WEIGHTS")  # fmt: skip


# --- loading, once per process ----------------------------------------------------------

_LOADED: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def device_for(models: ModelsConfig) -> str:
    import torch

    if models.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if models.device == "cuda":
        raise ConfigError("models.device is cuda but no CUDA device is visible")
    return "cpu"


def cached(key: tuple, load):
    """Load once per process (stages in one actor share a CLIP backbone)."""
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load()
        return _LOADED[key]


def load_open_clip(ref: WeightRef, arch: str, pretrained: str | None, device: str,
                   models: ModelsConfig):  # fmt: skip
    """(model, preprocess, tokenizer) for a resolved open_clip reference, shared per process."""

    def load():
        import open_clip

        if ref.resolved and Path(ref.resolved).is_dir() and ref.kind == "open_clip" and (
            Path(ref.resolved) / "open_clip_config.json").is_file():  # fmt: skip
            name = f"local-dir:{ref.resolved}"
            model, _, pre = open_clip.create_model_and_transforms(name, device=device)
            tok = open_clip.get_tokenizer(name)
        elif ref.resolved and Path(ref.resolved).is_file():
            model, _, pre = open_clip.create_model_and_transforms(
                arch, pretrained=ref.resolved, device=device)  # fmt: skip
            tok = open_clip.get_tokenizer(arch)
        else:  # an HF cache entry (or a permitted download): open_clip's own lookup
            if not models.allow_download:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            model, _, pre = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, cache_dir=hf_cache(models))  # fmt: skip
            tok = open_clip.get_tokenizer(arch)
        model.eval()
        if device == "cuda":
            model.half()
        return model, pre, tok

    return cached(("open_clip", ref.resolved or ref.model, device), load)


# --- `hdvg models` ----------------------------------------------------------------------


def model_refs(cfg) -> list[WeightRef]:
    """Every weight reference of the recipe's model stages (nothing is loaded)."""
    from .stages import REGISTRY, build_stage

    refs: list[WeightRef] = []
    for name, params in cfg.clip_stages.items():
        st = build_stage(name, params)
        if hasattr(st, "weights") and REGISTRY[name].uses_model:
            st.models = cfg.models
            refs += st.weights()
    return refs


def _cmd(args: argparse.Namespace) -> int:
    from .config import from_dict, load_pipeline, parse_overrides
    from .stages import REGISTRY

    try:
        if args.pipeline:
            cfg = load_pipeline(args.pipeline, parse_overrides(args.set or []))
        else:  # every model stage at its defaults
            names = {n: {} for n, c in REGISTRY.items() if c.uses_model and hasattr(c, "weights")}
            cfg = from_dict({"clip_stages": names}, "defaults", parse_overrides(args.set or []))
        refs = model_refs(cfg)
    except ConfigError as e:
        print(f"hdvg models: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) | {"label": r.label} for r in refs], indent=2))
    elif not refs:
        print(f"{args.pipeline}: no stage needs model weights")
    else:
        rows = [("stage", "model", "looks in", "found")]
        rows += [(r.stage, r.model, r.where, "yes" if r.found else "NO") for r in refs]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    missing = [r for r in refs if not r.found]
    return 1 if missing and args.check else 0


def register(sub) -> None:
    p = sub.add_parser("models", help="which model each stage uses, weights found or not")
    p.add_argument("pipeline", nargs="?", help="pipeline YAML (default: every model stage)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="a JSON list, an object per stage")
    p.add_argument("--check", action="store_true", help="exit 1 when any weights are missing")
    p.set_defaults(func=_cmd)
