"""Sums over data-parallel ranks for losses whose value depends on the whole batch.

Inside :func:`over_ranks` (the training step under torchrun) these helpers reduce over the
default process group; outside it, or in a single process, they return their input. Evaluation
runs on one rank and stays outside, so it never waits for a collective.

Why per-batch statistics are summed and not averaged: a loss such as the Mod-Squad mutual
information or the balance loss is a non-linear function of batch-wide sums (router probability
per expert, tokens per expert). The single-process value on the global batch needs the global
sums; averaging per-rank losses would give a different loss and gradient.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_ACTIVE = False


@contextlib.contextmanager
def over_ranks():
    """Make :func:`sum_over_ranks` and :func:`mean_count_over_ranks` reduce over ranks."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = previous


def active_world_size() -> int:
    """World size the helpers reduce over right now (1 outside :func:`over_ranks`)."""
    if _ACTIVE and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable: the backward pass sums the gradients of every
    rank's copy, so with data-parallel gradient averaging each rank's inputs receive exactly
    the single-process gradient."""
    if active_world_size() == 1:
        return x
    return _SumOverRanks.apply(x)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the incoming gradient (y = sum_r x_r, so
    dL/dx_r = sum over ranks of dL_r/dy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def mean_count_over_ranks(count: float, device: torch.device) -> float | torch.Tensor:
    """The mean over ranks of a per-batch count (e.g. boxes, known on the host), for normalising a
    summed loss: a float in one process; under :func:`over_ranks` a 0-d tensor on ``device`` (the
    all-reduce result is used as it is, never read back, so the step does not wait for it).

    A rank's loss is its local sum over (global count / world size); data-parallel gradient
    averaging then gives the global sum over the global count, as in one process.
    """
    world = active_world_size()
    if world == 1:
        return float(count)
    t = torch.tensor(float(count), dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return t / world
