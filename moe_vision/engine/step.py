"""One optimizer step's forward as a module: every task of the step, its losses, the router
auxiliary losses, summed into one loss.

Wrapping the whole step in one ``forward`` lets ``DistributedDataParallel`` see one forward per
backward even when a step accumulates several tasks, and find the task heads and routers the
step did not use (``find_unused_parameters=True``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.profiler import record_function

from ..moe.reduce import over_ranks


class MultiTaskStep(nn.Module):
    """``forward(batches)`` with ``batches = [(task, images, targets), ...]`` returns
    ``(loss, logs, aux, routing)``: the weighted sum of task losses plus the router aux losses,
    per-task loss floats, the :class:`AuxLosses` and the routing outputs."""

    def __init__(self, model: nn.Module, weighting: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.weighting, self.amp_dtype = model, weighting, amp_dtype

    def forward(self, batches: Sequence[tuple[str, torch.Tensor, list]]):
        device = next(self.model.parameters()).device
        routing, total, logs = [], 0.0, {}
        for task, images, targets in batches:
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                # Named phases show up in torch.profiler traces (tools/profile_step.py).
                with record_function(f"forward/{task}"):
                    out, r = self.model(images.to(device), task, return_routing=True, targets=targets)
                with record_function(f"loss/{task}"), over_ranks():
                    losses = self.model.task_loss(task, out, targets)
            routing += r
            total = total + self.weighting(task, losses["loss"])
            logs[task] = {k: float(v.detach()) for k, v in losses.items()}
        with over_ranks():  # batch-wide router statistics summed over ranks
            aux = self.model.backbone.aux_losses(routing)
        return total + aux.total.to(device), logs, aux, routing
