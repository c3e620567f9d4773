"""A training step's figures (loss, per-task losses, router aux losses, gradient norm, dropped
tokens) stay on the device between log steps and are read on the host in one go every
``train.log_every`` steps: the step itself never waits for the device, so CUDA graphs and
asynchronous execution can run ahead. The non-finite check happens at the same read, and names the
first bad step; :meth:`StepLog.flush` is also called before every checkpoint and evaluation, so
nothing non-finite is ever saved.

Under torchrun every rank calls :meth:`StepLog.flush` at the same steps (it averages the losses
over ranks with one collective); only the main rank writes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .distributed import DistContext


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradient norm was NaN or infinite."""


@dataclass
class PendingStep:
    """One step's figures, still on the device."""

    step: int
    tasks: list[str]
    lr: float
    loss: torch.Tensor
    task_losses: dict[str, dict[str, torch.Tensor]]
    aux: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    dropped_tokens: torch.Tensor | int
    extra: dict[str, Any] = field(default_factory=dict)  # host values (e.g. a skipped step's tasks)


def _scalar(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).detach().reshape(())


class StepLog:
    """Pending steps, flushed into ``train_log.jsonl`` records (the same fields as always)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.pending: list[PendingStep] = []

    def add(self, step: PendingStep) -> None:
        self.pending.append(step)

    def flush(self) -> list[dict]:
        """Read every pending step on the host (one transfer, and one all-reduce of the losses
        under torchrun) and return their records, oldest first. Raises :class:`NonFiniteLoss` for
        the first step whose loss or gradient norm is not finite."""
        if not self.pending:
            return []
        device = self.pending[0].loss.device
        mean_parts, local_parts = [], []
        for p in self.pending:  # averaged over ranks: the step's loss and each task's loss terms
            mean_parts += [_scalar(p.loss)] + [_scalar(v) for t in sorted(p.task_losses)
                                               for _, v in sorted(p.task_losses[t].items())]
            local_parts += [_scalar(v) for _, v in sorted(p.aux.items())]
            local_parts += [_scalar(p.grad_norm if p.grad_norm is not None else float("nan")),
                            _scalar(p.dropped_tokens)]
        means = torch.stack([x.to(device) for x in mean_parts])
        if self.ctx.enabled:
            dist.all_reduce(means)
            means = means / self.ctx.world_size
        values = torch.cat([means, torch.stack([x.to(device) for x in local_parts])]).tolist()  # the host read
        mean_vals, local_vals = iter(values[:len(mean_parts)]), iter(values[len(mean_parts):])
        records = []
        for p in self.pending:
            loss = next(mean_vals)
            task_losses = {t: {k: next(mean_vals) for k, _ in sorted(p.task_losses[t].items())}
                           for t in sorted(p.task_losses)}
            aux = {k: next(local_vals) for k, _ in sorted(p.aux.items())}
            grad_norm, dropped = next(local_vals), next(local_vals)
            records.append({"step": p.step, "tasks": p.tasks, "loss": loss,
                            "task_losses": {t: task_losses[t] for t in p.task_losses}, "aux": aux, "lr": p.lr,
                            "grad_norm": None if p.grad_norm is None else grad_norm,
                            "dropped_tokens": int(dropped), **p.extra})
        self.pending.clear()
        for r in records:
            if not r.get("skipped") and not (math.isfinite(r["loss"]) and
                                                   (r["grad_norm"] is None or math.isfinite(r["grad_norm"]))):
                bad = [t for t, ls in r["task_losses"].items() if not math.isfinite(ls["loss"])]
                what = f"loss is {r['loss']}" if not math.isfinite(r["loss"]) else f"gradient norm is {r['grad_norm']}"
                raise NonFiniteLoss(f"step {r['step']}: {what} (tasks {', '.join(bad) or ', '.join(r['tasks'])})")
        return records


def write_records(records: list[dict], log_file, writer, ema: dict[str, float]) -> None:
    """Append records to ``train_log.jsonl``, TensorBoard and the per-task loss moving average."""
    for rec in records:
        log_file.write(json.dumps(rec) + "\n")
        step = rec["step"]
        for task, ls in rec["task_losses"].items():
            if math.isfinite(ls["loss"]):
                ema[task] = ls["loss"] if task not in ema else 0.9 * ema[task] + 0.1 * ls["loss"]
            writer.add_scalar(f"loss/{task}", ls["loss"], step)
        for k, v in rec["aux"].items():
            writer.add_scalar(f"aux/{k}", v, step)
        writer.add_scalar("lr", rec["lr"], step)
    log_file.flush()
