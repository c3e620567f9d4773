"""How fast the data pipeline delivers training images: decode + augment, per worker process and
for a pool of workers, for each task of an experiment, on real-size JPEG fixtures."""
from __future__ import annotations

import time
from typing import Any, Mapping

from .sampler import InfiniteBatches, SeededItems, collate, item_seed


def in_process_rate(dataset, images: int, passes: int = 3) -> float:
    """Images per second that one process (= one worker) loads: read, decode, augment; the best
    of ``passes`` passes over the same images (the machine's other work only slows a pass down)."""
    items = SeededItems(dataset)
    n = min(images, len(dataset))
    items[(0, 0)]  # warm up (imports, first-call costs)
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(n):
            items[(item_seed(0, 0, i), i)]
        best = max(best, n / (time.perf_counter() - t0))
    return best


def pool_rate(dataset, images: int, workers: int, batch_size: int = 8) -> float:
    """Images per second that ``workers`` DataLoader worker processes deliver (collated, padded
    batches), after the first batch (worker start-up is not counted)."""
    it = InfiniteBatches(dataset, min(batch_size, len(dataset)), collate, name="bench", num_workers=workers)
    next(it)
    batches = max(1, images // it.batch_size)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * it.batch_size / (time.perf_counter() - t0)
    it.close()
    return rate


def loader_rates(datasets: Mapping[str, Any], images: int = 64, workers: int = 2,
                 decoders: tuple[str, ...] = ("pil", "torchvision")) -> dict[str, dict]:
    """``{task: {"per_worker": {decoder: img/s}, "pool": img/s with the better decoder, "decoder": ...}}``."""
    from ..engine.builders import set_decoder
    out = {}
    for task, ds in datasets.items():
        per = {}
        for name in decoders:
            set_decoder(ds, name)
            per[name] = in_process_rate(ds, images)
        best = max(per, key=per.get)
        set_decoder(ds, best)
        out[task] = {"per_worker": per, "decoder": best,
                     "pool": pool_rate(ds, images, workers) if workers else per[best], "workers": workers}
    return out
