"""What a run needs before its first step: the config's sanity checks, the seed, the synthetic
benchmark on disk, the autocast dtype and the data loaders' worker counts."""
from __future__ import annotations

import os
import random
from typing import Any, Mapping

import numpy as np
import torch

from ..data.synthetic import SyntheticConfig, generate, is_complete


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_synthetic(data_cfg: Mapping[str, Any], progress=print) -> None:
    """Generate the built-in benchmark if the data config asks for it and it is missing."""
    syn = data_cfg.get("synthetic")
    if not syn or is_complete(data_cfg["root"]):
        return
    progress(f"generating the synthetic benchmark in {data_cfg['root']} ...")
    generate(data_cfg["root"], SyntheticConfig(**syn), progress=lambda m: progress(f"  {m}"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise ValueError(f"train.precision={precision!r}; expected auto, fp32 or bf16")


def check_train_config(cfg: Mapping[str, Any]) -> None:
    """One clear error for values that would train nothing or nonsense."""
    t = cfg["train"]
    for key in ("steps", "lr"):
        if not float(t[key]) > 0:
            raise ValueError(f"train.{key}={t[key]} must be positive")
    for key in ("warmup_steps", "weight_decay", "grad_clip"):
        if float(t.get(key) or 0) < 0:
            raise ValueError(f"train.{key}={t[key]} must be >= 0")
    for task, tc in cfg["tasks"].items():
        if not int(tc.get("batch_size", 0)) > 0:
            raise ValueError(f"tasks.{task}.batch_size={tc.get('batch_size')} must be a positive integer")
    if int(cfg["eval"].get("batch_size", 1)) <= 0:
        raise ValueError(f"eval.batch_size={cfg['eval']['batch_size']} must be a positive integer")


def task_workers(data_cfg: Mapping[str, Any], task: str) -> int:
    """Loader worker processes of one task: ``data.tasks.<task>.num_workers``, else ``data.num_workers``."""
    entry = (data_cfg.get("tasks") or {}).get(task) or {}
    n = entry.get("num_workers")
    return int(data_cfg.get("num_workers") or 0) if n is None else int(n)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, as PyTorch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1


def cap_workers(workers: Mapping[str, int], cores: int | None = None) -> tuple[dict[str, int], str | None]:
    """Worker counts no larger than the machine's cores, and one line saying what changed (None
    when nothing did). More loader processes than cores only compete for them, and PyTorch would
    warn once per loader; batches do not depend on the worker count (augmentation is seeded per
    item), so capping changes no result."""
    cores = cores or usable_cores()
    capped = {name: min(n, cores) for name, n in workers.items()}
    over = [f"{name} {n}" for name, n in workers.items() if n > cores]
    if not over:
        return capped, None
    return capped, (f"data loader workers asked for ({', '.join(over)}) exceed the {cores} CPU core(s) here: "
                    f"using {cores} per loader")
