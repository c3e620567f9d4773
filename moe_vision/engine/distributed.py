"""Process-group setup for runs under ``torchrun``: backend from the device, explicit timeout,
rank / world size, and the few collectives the trainer needs (barrier, log means). How the model is
spread over the ranks (DDP, FSDP2, expert parallelism) is in :mod:`moe_vision.engine.parallel`.

A process started without torchrun (no ``WORLD_SIZE`` in the environment, or 1) is a world of
one: every helper here then does nothing, so single-process code paths stay untouched.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .._compat import require_distributed_torch


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes logs, reports, pictures and plain model files."""
        return self.rank == 0

    def shutdown(self, poll_s: float = 0.2) -> None:
        """Leave the process group (end of a run), all ranks together: a rank that tears down its
        gloo connections while another still holds them open can abort in the C++ teardown. The
        meeting goes through the rendezvous store, not a collective, so ranks that finish early
        (rank 0 evaluates alone) wait without a collective's timeout; should rank 0 fail instead,
        torchrun stops the others."""
        if not (self.enabled and dist.is_initialized()):
            return
        import time
        store = dist.distributed_c10d._get_default_store()
        key = "moe_vision/finished"
        store.add(key, 1)
        while store.add(key, 0) < self.world_size:
            time.sleep(poll_s)
        dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (a collective under torchrun; ``obj`` as is otherwise)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, dist_cfg: Mapping[str, Any] | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (once per process).

    ``dist_cfg`` is the ``dist`` config group: ``timeout_s`` bounds every collective (a rank
    that dies makes the others fail with an error within that time instead of hanging).
    """
    dist_cfg = dist_cfg or {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    require_distributed_torch()
    timeout_s = float(dist_cfg.get("timeout_s", 600))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, backend)


def current_context() -> DistContext:
    """The context of the process group this process already joined (a world of one otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       dist.get_backend())

