"""Evaluation items kept in memory between evaluations of the same split in one process.

Evaluating a split decodes and transforms every image again. The downstream benchmark evaluates
the same Fashion-MNIST test split (10,000 PNGs, about 7 s to read and transform on 2 cores) after
each of its runs in one process, so it reads that split once. An item is reused only when
nothing about it can differ: the same files (path, label, size, modification time), the same
class list and decoder, and a transform that draws nothing at random with the same
:attr:`~moe_vision.data.transforms.TaskTransform.signature`. Datasets say so through a
``reuse_key()`` method (None: never reuse); the least recently used splits are dropped beyond
:data:`MAX_BYTES`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

MAX_BYTES = 1 << 30  # about four Fashion-MNIST test splits at 32 px (float32)


def item_bytes(item: Any) -> int:
    """The tensor bytes an ``(image, target)`` item holds."""
    image, target = item
    values = [image, *(target.values() if isinstance(target, dict) else [])]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


class ItemCache:
    """Items by split key and index, the least recently used splits dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.splits: OrderedDict[Hashable, dict[int, Any]] = OrderedDict()
        self.sizes: dict[Hashable, int] = {}
        self.too_large: set[Hashable] = set()  # splits bigger than max_bytes on their own: never kept

    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def clear(self) -> None:
        self.splits.clear()
        self.sizes.clear()
        self.too_large.clear()

    def loader(self, dataset, load: Callable[[int], Any]) -> Callable[[int], Any]:
        """``index -> item`` for ``dataset``: kept items where its ``reuse_key()`` allows, else
        ``load(index)``, whose ``(image, target)`` results are kept (anything else, such as a
        reading error, is passed on and not kept)."""
        reuse_key = getattr(dataset, "reuse_key", None)
        key = reuse_key() if reuse_key is not None and self.max_bytes > 0 else None
        if key is None or key in self.too_large:
            return load
        memo = self.splits.setdefault(key, {})
        self.splits.move_to_end(key)
        self.sizes.setdefault(key, 0)

        def get(index: int):
            item = memo.get(index)
            if item is None:
                item = load(index)
                if not (isinstance(item, tuple) and len(item) == 2):
                    return item
                if key not in self.too_large:
                    memo[index] = item
                    self.sizes[key] += item_bytes(item)
                    self._shrink(keep=key)
            image, target = item
            return image, dict(target) if isinstance(target, dict) else target  # (a caller may add keys)
        return get

    def _shrink(self, keep: Hashable) -> None:
        if self.sizes[keep] > self.max_bytes:  # larger than the limit on its own: not kept at all
            del self.splits[keep], self.sizes[keep]
            self.too_large.add(keep)
            return
        while self.nbytes() > self.max_bytes:
            oldest = next(k for k in self.splits if k != keep)
            del self.splits[oldest], self.sizes[oldest]

EVAL_ITEMS = ItemCache()  # the process's cache of evaluation items (engine.evaluate reads through it)
