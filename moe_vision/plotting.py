"""Plotting helpers every room that draws a picture uses: a headless pyplot, atomic PNG saving,
and normalised image tensors back to displayable RGB."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .io_utils import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG at ``path`` (to a temporary file, then renamed) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path


def to_rgb(image_3HW: torch.Tensor) -> np.ndarray:
    """A normalised image tensor (ImageNet mean/std) as ``[H, W, 3]`` floats in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image_3HW.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
