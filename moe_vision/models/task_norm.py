"""Batch normalisation with per-task statistics (``model.task_norm``).

Each dataset of a heterogeneous batch mix has its own image statistics (one centred object; many
small objects; scenes), and a BatchNorm shared by every task keeps one running mean and variance:
a blend that fits none of them at evaluation time, while training normalises each task's batch by
its own statistics. Keeping the running statistics per task (``stats``) makes evaluation see
what training saw, at no cost in parameters; ``affine`` also gives each task its own scale and
shift (a few hundred parameters per task: task-conditioned normalisation in the shared stem).
Multi-domain networks use the same device (domain-specific batch normalisation).

A task's statistics (and, with ``affine``, its scale and shift) live under ``per_task.<task>``,
so extraction keeps only its own and a task added later gets new ones without touching the old.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

TASK_NORMS = ("shared", "stats", "affine")


def check_task_norm(mode: str) -> str:
    if mode not in TASK_NORMS:
        raise ValueError(f"model.task_norm={mode!r}; expected one of {list(TASK_NORMS)}")
    return mode


class TaskBatchNorm2d(nn.Module):
    """``BatchNorm2d`` with running statistics per task (``forward(x, task)``); the scale and shift
    are shared (``affine=False`` per task) or per task (``per_task_affine``)."""

    def __init__(self, channels: int, tasks: Iterable[str], per_task_affine: bool = False) -> None:
        super().__init__()
        self.per_task_affine = per_task_affine
        self.per_task = nn.ModuleDict({t: nn.BatchNorm2d(channels, affine=per_task_affine) for t in tasks})
        self.weight = None if per_task_affine else nn.Parameter(torch.ones(channels))
        self.bias = None if per_task_affine else nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        y = self.per_task[task](x)
        if self.weight is not None:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y
