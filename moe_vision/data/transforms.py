"""Per-task train/eval pipelines with torchvision transforms v2 (boxes and masks move with the image).

Input geometry (task config keys, stored with the model so that prediction resizes the same way):

- ``resize: square``: to ``img_size x img_size`` (classification trains with RandomResizedCrop);
- ``resize: crop``: classification's evaluation recipe: short side to ``img_size / crop_pct``,
  then the centre ``img_size x img_size`` (training as ``square``);
- ``resize: long``: the long side to ``img_size``, aspect ratio kept (det/seg/depth default);
- ``resize: short``: the short side to ``img_size``, the long side capped at ``max_size``.

Training augmentations (``tasks.<t>.transforms``): ``hflip`` (probability), ``scale`` (square /
crop: RandomResizedCrop's area range) and ``jitter`` (``[lo, hi]``, long / short: the target size
is multiplied by a random factor; what then exceeds the canvas is cropped at a random place).

Every pipeline records ``target["input_size"]`` (height, width after resizing, before any batch
padding) and ``target["orig_size"]``. For evaluation, dense targets (segmentation masks, depth
maps) are left at the original resolution, where the metrics are computed.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("square", "crop", "long", "short")


def resized_shape(height: int, width: int, size: int, mode: str, max_size: int | None = None,
                  factor: float = 1.0) -> tuple[int, int]:
    """The ``(h, w)`` an image of ``height x width`` is resized to (aspect-preserving modes)."""
    if mode == "long":
        s = size * factor / max(height, width)
    elif mode == "short":
        s = size * factor / min(height, width)
        if max_size:
            s = min(s, max_size * factor / max(height, width))
    else:
        raise ValueError(f"resize={mode!r} keeps no aspect ratio; expected 'long' or 'short'")
    return max(1, round(height * s)), max(1, round(width * s))


def canvas_side(size: int, mode: str, max_size: int | None = None) -> int:
    """The largest side a pipeline's output can have (the frame positions are measured in)."""
    return int(max_size) if mode == "short" and max_size else int(size)


class AspectResize(v2.Transform):
    """Resize keeping the aspect ratio (``mode`` long / short), optionally by a random factor in
    ``jitter``; with jitter, an output larger than the canvas (``size``, or ``max_size`` in short
    mode) is cropped back to it at a random place."""

    def __init__(self, size: int, mode: str = "long", max_size: int | None = None,
                 jitter: Sequence[float] | None = None) -> None:
        super().__init__()
        self.size, self.mode, self.max_size = int(size), mode, max_size
        self.jitter = tuple(float(j) for j in jitter) if jitter else None
        if mode not in ("long", "short"):
            raise ValueError(f"resize={mode!r} keeps no aspect ratio; expected 'long' or 'short'")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        factor = float(torch.empty(()).uniform_(*self.jitter)) if self.jitter else 1.0
        out_h, out_w = resized_shape(h, w, self.size, self.mode, self.max_size, factor)
        limit = canvas_side(self.size, self.mode, self.max_size)
        crop_h, crop_w = min(out_h, limit), min(out_w, limit)
        top = int(torch.randint(0, out_h - crop_h + 1, ())) if out_h > crop_h else 0
        left = int(torch.randint(0, out_w - crop_w + 1, ())) if out_w > crop_w else 0
        return {"size": (out_h, out_w), "crop": (top, left, crop_h, crop_w) if (crop_h, crop_w) != (out_h, out_w)
                else None}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._call_kernel(TF.resize, inpt, list(params["size"]), antialias=True)
        if params["crop"] is not None:
            top, left, h, w = params["crop"]
            out = self._call_kernel(TF.crop, out, top=top, left=left, height=h, width=w)
        return out


class TaskTransform:
    """``(image, target) -> (image, target)``: the v2 pipeline plus the bookkeeping every task
    needs (``input_size``, ``orig_size``; dense eval targets kept at full resolution)."""

    def __init__(self, ops: v2.Compose, keep_dense_targets: bool, signature: tuple | None = None) -> None:
        self.ops, self.keep_dense_targets = ops, keep_dense_targets
        # What the pipeline does, when it draws nothing at random (evaluation): two transforms with
        # the same signature give the same output, so a transformed item may be reused.
        self.signature = signature

    def __call__(self, image, target=None):
        """The transformed image alone when no target is given, else ``(image, target)``."""
        if target is None:
            return self.ops(image)
        h, w = image.shape[-2:]
        kept = {}
        if self.keep_dense_targets:
            # Plain tensors pass through v2 untouched: metrics are computed at the original size.
            kept = {k: v.as_subclass(torch.Tensor) for k, v in target.items() if isinstance(v, tv_tensors.Mask)}
        image, target = self.ops(image, {k: v for k, v in target.items() if k not in kept})
        target = {**target, **kept}
        target.setdefault("orig_size", torch.tensor([h, w]))
        target["input_size"] = torch.tensor(image.shape[-2:])
        return image, target


def build_transforms(task: str, train: bool, size: int, hflip: float = 0.0,
                     scale: Sequence[float] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, resize: str | None = None, max_size: int | None = None,
                     jitter: Sequence[float] | None = None, crop_pct: float = 0.875) -> TaskTransform:
    """The pipeline of a task type (``cls``, ``det``, ``seg``, ``depth``, ``mim``, ...) for training
    or evaluation at ``size`` (see the module docstring for the options). Training detection drops
    boxes that a crop made empty. The default ``resize`` is ``square`` for classification-like tasks and
    ``long`` for det, seg and depth; on square images every mode gives the same output."""
    resize = resize or ("long" if task in ("det", "seg", "depth") else "square")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}; expected one of {', '.join(RESIZE_MODES)}")
    ops: list = []
    if resize in ("square", "crop"):
        if train and scale:
            ops.append(v2.RandomResizedCrop((size, size), scale=tuple(scale), antialias=True))
        elif resize == "crop" and not train:
            ops += [v2.Resize(int(math.floor(size / float(crop_pct))), antialias=True), v2.CenterCrop(size)]
        else:
            ops.append(v2.Resize((size, size), antialias=True))
    else:
        ops.append(AspectResize(size, resize, max_size, jitter if train else None))
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if task == "det" and train:  # (evaluation does not crop: every box keeps its size)
        ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    signature = None if train else (task, size, resize, max_size, float(crop_pct),
                                    tuple(float(m) for m in mean), tuple(float(s) for s in std))
    return TaskTransform(v2.Compose(ops), keep_dense_targets=not train and task in ("seg", "depth"),
                         signature=signature)
