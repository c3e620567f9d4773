"""Per-task train/eval pipelines with torchvision transforms v2 (boxes and masks move with the image)."""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(task: str, train: bool, size: int, hflip: float = 0.0,
                     scale: Sequence[float] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Resize (or random-resized-crop with ``scale`` when training) to ``size`` x ``size``,
    optional horizontal flip, float conversion and normalisation. Detection drops boxes that the
    crop made empty."""
    ops: list = []
    if train and scale:
        ops.append(v2.RandomResizedCrop((size, size), scale=tuple(scale), antialias=True))
    else:
        ops.append(v2.Resize((size, size), antialias=True))
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if task == "det":
        ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)
