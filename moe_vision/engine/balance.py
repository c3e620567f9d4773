"""Multi-task gradient balancing on the shared parameters (``train.balance``), called by the
training step in place of one backward pass over the summed loss.

- ``none``: the plain sum of the task losses (one backward pass), the default.
- ``pcgrad``: gradient surgery (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning"): each
  task's gradient on the shared parameters loses its component along any other task's gradient it
  conflicts with (negative dot product), in a random task order, before the sum.
- ``normalize``: each shared parameter group (the groups of :mod:`moe_vision.engine.transfer`)
  gets every task's gradient rescaled to the tasks' mean norm before the sum, so no task's update
  dominates a group by the scale of its loss (GradNorm's goal of equal gradient norms, reached in
  one step instead of by learned loss weights).

Task-owned parameters (heads, routers, task embeddings) get their task's gradient unchanged. Each
task's loss, with its own routers' balance and z losses, is backpropagated on its own (the same
work as one backward pass over the sum, plus a copy of the shared gradients per task); the MI loss,
which couples the tasks, is added after balancing (one more backward pass, only when its weight
is not 0). Data parallelism would all-reduce each of those passes, so balancing runs in one
process only.
"""
from __future__ import annotations

import torch

from .transfer import shared_groups

BALANCE_METHODS = ("none", "pcgrad", "normalize")


def pcgrad(grads_TP: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's combined gradient ``[P]`` of per-task gradients ``[T, P]``: each task's gradient,
    projected off every other task's gradient it conflicts with (those taken in a random order),
    summed. No host reads: conflicts are masks, not branches."""
    T = grads_TP.shape[0]
    out = grads_TP.clone()
    sq_T = (grads_TP * grads_TP).sum(1).clamp(min=1e-20)
    for t in range(T):
        for s in torch.randperm(T, generator=generator).tolist():
            if s == t:
                continue
            dot = (out[t] * grads_TP[s]).sum()
            out[t] = out[t] - torch.clamp(dot, max=0.0) / sq_T[s] * grads_TP[s]
    return out.sum(0)


def normalized_sum(grads_TP: torch.Tensor) -> torch.Tensor:
    """Every task's gradient rescaled to the mean norm of the tasks that have one, then summed."""
    norms_T = grads_TP.norm(dim=1)
    active = (norms_T > 0).to(grads_TP.dtype)
    mean = (norms_T * active).sum() / active.sum().clamp(min=1)
    scale_T = torch.where(norms_T > 0, mean / norms_T.clamp(min=1e-20), torch.zeros_like(norms_T))
    return (grads_TP * scale_T[:, None]).sum(0)


class GradientBalance:
    """Backward pass of one training step under ``method`` (one of :data:`BALANCE_METHODS`)."""

    def __init__(self, model: torch.nn.Module, method: str = "none", seed: int = 0) -> None:
        if method not in BALANCE_METHODS:
            raise ValueError(f"train.balance={method!r}; expected one of {list(BALANCE_METHODS)}")
        self.method = method
        self.groups = shared_groups(model)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def per_task(self) -> bool:
        return self.method != "none"

    def backward(self, loss: torch.Tensor, split) -> None:
        """Gradients of ``loss`` into ``.grad``, balanced on the shared parameters; ``split`` =
        ``(per-task losses, coupled loss)`` summing to ``loss`` (see
        :class:`~moe_vision.engine.step.MultiTaskStep`)."""
        if not self.per_task or split is None or len(split[0]) < 2:
            loss.backward()
            return
        task_losses, coupled = split
        shared = [p for ps in self.groups.values() for p in ps]
        per_task: list[list[torch.Tensor]] = []
        last = len(task_losses) - 1
        for i, task_loss in enumerate(task_losses.values()):
            # (graphs the tasks share, the MI loss's at least, stay until the last pass)
            task_loss.backward(retain_graph=i < last or coupled.requires_grad)
            per_task.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in shared])
            for p in shared:
                p.grad = None
        if coupled.requires_grad:
            coupled.backward()
        start = 0
        for params in self.groups.values():
            sizes = [p.numel() for p in params]
            grads_TP = torch.stack([torch.cat([g.reshape(-1) for g in grads[start:start + len(params)]])
                                    for grads in per_task])
            combined = (pcgrad(grads_TP, self.generator) if self.method == "pcgrad" else normalized_sum(grads_TP))
            for p, g in zip(params, combined.split(sizes)):
                g = g.view_as(p)
                p.grad = g if p.grad is None else p.grad + g
            start += len(params)
