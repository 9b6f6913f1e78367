"""Random-weight models built from configs, for tests and benchmarks (no downloads).

The loading and inference code paths are the real ones; only the weights differ. Folders
are written with `save_pretrained` (HF), in open_clip's `local-dir` layout, or as `.pth`
heads in the LAION predictor's format, exactly where real weights would go.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a video of the man woman dog cat car red blue green street city sky water tree "
         "running walking sitting on in with and at near people field beach night").split()  # fmt: skip


def gpt2_tokenizer(directory: Path, vocab_size: int | None = None):
    """A byte-level BPE tokenizer over a small word vocabulary (or `vocab_size` entries)."""
    from transformers import GPT2Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(set("".join(WORDS))):
        vocab.setdefault(ch, len(vocab))
    for w in WORDS:
        vocab.setdefault("Ġ" + w, len(vocab))
    i = 0
    while vocab_size and len(vocab) < vocab_size - 1:  # room for the processor's <image>
        vocab.setdefault(f"Ġw{i}", len(vocab))
        i += 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return GPT2Tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         unk_token="<unk>", bos_token="</s>", eos_token="</s>",
                         pad_token="<pad>")  # fmt: skip


def bert_tokenizer(directory: Path):
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(toks) + "\n")
    return BertTokenizer(str(directory / "vocab.txt"))


def blip2_config(tokenizer_len: int, image_token_index: int, *, full: bool = False):
    """Tiny BLIP-2, or (full=True) the BLIP-2 OPT-2.7B shape (ViT-g, Q-Former, OPT-2.7B)."""
    from transformers import Blip2Config, OPTConfig

    if full:
        vision = dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=39,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        )
        qformer = dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            encoder_hidden_size=1408,
        )
        text = OPTConfig(vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, word_embed_proj_dim=2560,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)  # fmt: skip
        nq = 32
    else:
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        qformer = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=64,
        )
        text = OPTConfig(vocab_size=tokenizer_len + 8, hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)  # fmt: skip
        nq = 4
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                       num_query_tokens=nq, image_token_index=image_token_index)  # fmt: skip


def blip2_processor(directory: Path, image_size: int, num_query_tokens: int,
                    vocab_size: int | None = None):  # fmt: skip
    from transformers import Blip2Processor, BlipImageProcessor

    tok = gpt2_tokenizer(directory / "_tok", vocab_size)
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return Blip2Processor(ip, tok, num_query_tokens=num_query_tokens)


def save_tiny_blip2(directory: str | Path, seed: int = 0) -> Path:
    from transformers import Blip2ForConditionalGeneration

    d = Path(directory)
    proc = blip2_processor(d, 32, 4)
    cfg = blip2_config(len(proc.tokenizer), proc.tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d


def full_blip2(device: str = "cuda", dtype=torch.bfloat16, tmp: str | Path = "/tmp/hdvg-bench-tok"):
    """A BLIP-2 OPT-2.7B-shaped model with random weights, built on `device` (not saved:
    8 GB of random weights are not worth the disk), and its processor."""
    from transformers import Blip2ForConditionalGeneration

    proc = blip2_processor(Path(tmp), 224, 32, vocab_size=50272)
    cfg = blip2_config(len(proc.tokenizer), proc.tokenizer.convert_tokens_to_ids("<image>"),
                       full=True)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(cfg).to(dtype)
    return model.eval(), proc


def save_tiny_blip(directory: str | Path, seed: int = 0) -> Path:
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    d = Path(directory)
    tok = bert_tokenizer(d / "_tok")
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, encoder_hidden_size=32,
                         max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    BlipForConditionalGeneration(cfg).save_pretrained(d)
    ip = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(ip, tok).save_pretrained(d)
    return d


OPEN_CLIP_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_open_clip(directory: str | Path, seed: int = 0) -> Path:
    """open_clip `local-dir` layout: open_clip_config.json + open_clip_pytorch_model.bin."""
    import open_clip

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pre = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    (d / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_TINY, "preprocess_cfg": pre})
    )
    torch.manual_seed(seed)
    torch.save(
        open_clip.model.CLIP(**OPEN_CLIP_TINY).state_dict(), d / "open_clip_pytorch_model.bin"
    )
    return d


def save_laion_mlp_head(path: str | Path, dim: int, seed: int = 0) -> Path:
    """A head in the LAION improved-aesthetic-predictor layout (layers.0 … layers.7)."""
    from .heads import LaionMLP

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(LaionMLP(dim).state_dict(), path)
    return path


def save_linear_head(path: str | Path, dim: int, outputs: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Linear(dim, outputs).state_dict(), path)
    return path
