"""hdvg: curate HD-VG-130M-style text-video datasets on Ray, and train a swap-attention T2V model."""

__version__ = "0.1.0"
PIPELINE_VERSION = f"hdvg-{__version__}"
