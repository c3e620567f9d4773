"""Process-group setup for runs under ``torchrun``: backend from the device, explicit timeout,
rank / world size, and the few collectives the trainer needs (barrier, log means). How the model is
spread over the ranks (DDP, FSDP2, expert parallelism) is in :mod:`moe_vision.engine.parallel`.

A process started without torchrun (no ``WORLD_SIZE`` in the environment, or 1) is a world of
one: every helper here then does nothing, so single-process code paths stay untouched.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
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
        store = dist.distributed_c10d._get_default_store()
        _meet(store, "moe_vision/finished", self.world_size, poll_s)
        # Without torchrun's agent store, rank 0 hosts the store: it leaves only after every rank
        # has seen the meeting complete, or a slower rank's last poll finds no server.
        if self.rank == 0 and not _agent_store_in_use():
            _meet(store, "moe_vision/left", self.world_size, poll_s)
        else:
            store.add("moe_vision/left", 1)
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
        timeout = datetime.timedelta(seconds=timeout_s)
        if rank == 0 and (notice := shared_store_restart_notice()):
            print(f"moe-vision: {notice}", file=sys.stderr)
        store = restart_round_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local_rank, backend)


def _meet(store, key: str, world_size: int, poll_s: float) -> None:
    """Count this rank in at ``key`` and wait until ``world_size`` ranks have."""
    store.add(key, 1)
    while store.add(key, 0) < world_size:
        time.sleep(poll_s)


def elastic_restart() -> int:
    """How often torchrun has restarted this job's workers (0: the first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _agent_store_in_use() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def restart_round_store(timeout: datetime.timedelta):
    """The rendezvous store for this process under single-node ``torchrun --max-restarts``, with
    its keys kept apart per restart round (None elsewhere: torch's own env:// setup is used).

    torchrun's agent keeps one store for the whole job and hands it to every restarted round, so
    the keys that the previous round's ranks wrote when they connected (their gloo addresses) are
    still there: a restarted rank could read a dead peer's address and fail with "Connection
    refused", or hang. Prefixing every key with the restart count keeps each round to its own keys.
    The count is the same on every rank only when one agent starts them all (one node); on
    several nodes each agent counts its own restarts, so there the store stays as torch sets it
    up (set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun: a fresh store per round).
    """
    if not _agent_store_in_use() or int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moe_vision/restart_{elastic_restart()}", client)


def shared_store_restart_notice() -> str | None:
    """One line for multi-node ``torchrun --max-restarts`` with torch's shared agent store, where
    a restarted round can read the previous round's addresses (None when that cannot happen)."""
    if not _agent_store_in_use() or int(os.environ.get("GROUP_WORLD_SIZE", "1")) == 1:
        return None
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0:
        return None
    return ("torchrun restarts on several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
            "torchrun's environment (its shared store keeps the previous round's addresses and a "
            "restarted round can fail to connect); see docs/resilience.md")


def current_context() -> DistContext:
    """The context of the process group this process already joined (a world of one otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       dist.get_backend())

