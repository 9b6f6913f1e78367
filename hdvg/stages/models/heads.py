"""Small heads on CLIP image embeddings, in the formats LAION publishes.

- LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor,
  e.g. sac+logos+ava1-l14-linearMSE.pth): an MLP whose state dict keys are
  layers.{0,2,4,6,7}.{weight,bias}, fed L2-normalized CLIP ViT-L/14 image embeddings.
- A linear head (`weight`, `bias`): the LAION-Aesthetics v1 linear probe, or a watermark
  classifier on CLIP embeddings with 1 (logit) or 2 (clean, watermark) outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class LaionMLP(nn.Module):
    """The LAION aesthetic MLP (dropouts included so the state-dict keys line up)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(path: str | Path, dim: int, where: str) -> nn.Module:
    """A head from a state dict file; its input size must match the CLIP embedding size."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if "layers.0.weight" in sd:
        in_dim = sd["layers.0.weight"].shape[1]
        head: nn.Module = LaionMLP(in_dim)
    elif "weight" in sd:
        in_dim = sd["weight"].shape[1]
        head = nn.Linear(in_dim, sd["weight"].shape[0])
    else:
        raise ValueError(f"{where}: {path} is neither a LAION MLP nor a linear head "
                         f"(keys: {', '.join(list(sd)[:6])})")  # fmt: skip
    if in_dim != dim:
        raise ValueError(f"{where}: head {path} expects {in_dim}-d embeddings, the CLIP "
                         f"backbone gives {dim}-d (use the backbone the head was trained on)")  # fmt: skip
    head.load_state_dict(sd)
    return head.eval()
