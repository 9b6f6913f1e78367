"""The swap-attention text-to-video model (arXiv 2305.10874), its trainer and its sampler.

Modules:

- ``config``   typed configs (one YAML -> dataclasses) and U-Net size presets
- ``swap``     3D-window partition/merge and the swap cross-attention
- ``unet``     the latent video U-Net in the ModelScope-T2V / SD-2.x layout
- ``weights``  loading diffusers / ModelScope U-Net checkpoints onto it
- ``text``     text encoders (OpenCLIP penultimate layer, transformers CLIP)
- ``vae``      the diffusers ``AutoencoderKL`` wrapper (frames <-> latents)
- ``data``     the streaming ``IterableDataset`` over hdvg WebDataset shards
- ``train``    ``hdvg train``;  ``sample``: ``hdvg sample``;  ``cli``: argparse wiring

Heavy imports (torch, diffusers) live in the submodules, so ``import hdvg.t2v`` is cheap.
"""
