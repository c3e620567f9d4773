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

from ..moe.losses import aux_losses_by_task
from ..moe.reduce import over_ranks


class MultiTaskStep(nn.Module):
    """``forward(batches)`` with ``batches = [(task, images, targets), ...]`` returns
    ``(loss, logs, aux, routing, split)``: the weighted sum of task losses plus the router aux
    losses, per-task loss terms (detached tensors: read them when logging), the :class:`AuxLosses`,
    the routing outputs, and ``split`` = ``(per_task, coupled)``: each task's weighted loss with its
    own routers' balance and z losses, and the rest (the MI loss), which sum to ``loss`` (for the
    balancing methods that need each task's gradient on its own, :mod:`moe_vision.engine.balance`)."""

    def __init__(self, model: nn.Module, weighting: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.weighting, self.amp_dtype = model, weighting, amp_dtype
        self.split_by_task = False  # set by a balancing method that needs each task's loss

    def forward(self, batches: Sequence[tuple[str, torch.Tensor, list]]):
        device = next(self.model.parameters()).device
        routing, total, logs, task_losses = [], 0.0, {}, {}
        for task, images, targets in batches:
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                # Named phases show up in torch.profiler traces (tools/profile_step.py).
                with record_function(f"forward/{task}"):
                    out, r = self.model(images.to(device), task, return_routing=True, targets=targets)
                with record_function(f"loss/{task}"), over_ranks():
                    losses = self.model.task_loss(task, out, targets)
            routing += r
            task_losses[task] = self.weighting(task, losses["loss"])
            total = total + task_losses[task]
            logs[task] = {k: v.detach() for k, v in losses.items()}
        with over_ranks():  # batch-wide router statistics summed over ranks
            aux = self.model.backbone.aux_losses(routing)
        split = None
        if self.split_by_task:
            aux_T, coupled = aux_losses_by_task(routing, self.model.backbone.aux_weights)
            split = ({t: loss + aux_T.get(t, 0.0) for t, loss in task_losses.items()}, coupled.to(device))
        return total + aux.total.to(device), logs, aux, routing, split
