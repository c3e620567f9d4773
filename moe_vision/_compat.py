"""Environment checks run at import time."""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Callable


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def check_torchvision(import_module: Callable[[str], object] = importlib.import_module) -> None:
    """Import torchvision and check that its compiled ops load against the installed torch.

    A torchvision wheel built for another torch (e.g. PyPI's CUDA torchvision beside a CPU-only
    torch wheel) fails deep inside its import with ``operator torchvision::nms does not exist``;
    turn that into one error that says what is installed and how to fix it.
    """
    try:
        tv = import_module("torchvision")
        import torch
        if not hasattr(torch.ops.torchvision, "nms"):
            raise RuntimeError("operator torchvision::nms does not exist")
    except (RuntimeError, ImportError, OSError, AttributeError) as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "torchvision":
            raise ImportError("moe-vision needs torchvision: pip install torchvision "
                              "(in the same command as torch, so pip picks a matching pair)") from None
        raise ImportError(
            f"torchvision {_version('torchvision')} cannot load its compiled ops against torch "
            f"{_version('torch')} ({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
            "They must be builds for each other: reinstall both in one command, e.g. "
            "`pip install --force-reinstall torch torchvision` (with PIP_FIND_LINKS= if a local "
            "CPU-only torch wheel is being picked up), or the pairs listed at "
            "https://github.com/pytorch/vision#installation"
        ) from None
    del tv


MIN_DISTRIBUTED_TORCH = (2, 10)


def require_distributed_torch(version: str | None = None) -> None:
    """Refuse torch versions whose distributed pieces are known to be wrong for us.

    Before torch 2.10 the functional ``all_to_all_single`` returned no input gradient (expert
    parallelism trains silently wrong) and FSDP2 on CPU/gloo either fails (2.4 creates CUDA
    streams) or doubles gradients (2.8). Tested here on torch 2.14.
    """
    import torch
    version = version or torch.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if parts < MIN_DISTRIBUTED_TORCH:
        raise RuntimeError(f"distributed training (DDP, FSDP2, expert parallelism) needs torch >= "
                           f"{'.'.join(map(str, MIN_DISTRIBUTED_TORCH))}; this is torch {version}: "
                           "pip install --upgrade torch torchvision")
