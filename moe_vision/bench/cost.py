"""What one training step of a recipe costs, computed (not timed): FLOPs per image from
``torch.utils.flop_counter`` on a real forward + backward, activation memory from the tensors
autograd saves for backward (under bf16 autocast when asked), and parameter + optimizer memory.
From these, with a stated peak throughput and utilisation, the images/s a GPU consumes, memory
per GPU and time per epoch.

Counted on the CPU at each task's largest input (``img_size`` x ``img_size``), one image at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.transforms import canvas_side

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (NVIDIA's datasheet, without sparsity)


@dataclass
class StepCost:
    """One task's training step: FLOPs (forward + backward) and saved activation bytes per image,
    plus the activation bytes that do not grow with the batch (e.g. bf16 copies of the weights)."""

    task: str
    img_size: int
    train_flops: float
    activation_bytes: float
    fixed_bytes: float = 0.0


def _dummy_target(spec, size: int) -> dict:
    kind = spec.type_name
    t = {"orig_size": torch.tensor([size, size]), "input_size": torch.tensor([size, size])}
    if kind == "cls":
        t["label"] = torch.tensor(0)
    elif kind == "det":
        from torchvision import tv_tensors
        boxes = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.5, 0.1, 0.9, 0.4]]) * size
        t.update(boxes=tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size)),
                 labels=torch.tensor([0, min(1, spec.num_classes - 1)]), image_id=torch.tensor(0))
    elif kind == "seg":
        t["mask"] = torch.randint(0, spec.num_classes, (size, size))
    elif kind == "depth":
        t["depth"] = torch.rand(size, size) * 5 + 0.5
    return t


def _count(model, task: str, size: int, batch: int, bf16: bool) -> tuple[float, float]:
    spec = model.spec(task)
    x = torch.randn(batch, 3, size, size)
    targets = [_dummy_target(spec, size) for _ in range(batch)]
    saved = [0]

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            saved[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, routing = model(x, task, return_routing=True, targets=targets)
        loss = model.task_loss(task, out, targets)["loss"] + model.backbone.aux_losses(routing).total
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()), float(saved[0])


def task_cost(model, task: str, size: int, bf16: bool = True) -> StepCost:
    """FLOPs of a training forward + backward and the bytes of activations saved for backward, per
    ``size`` x ``size`` image of ``task``: counted at batch 1 and 2, so that what does not grow
    with the batch (the weights' bf16 copies) is set apart."""
    model.train()
    f1, m1 = _count(model, task, size, 1, bf16)
    f2, m2 = _count(model, task, size, 2, bf16)
    return StepCost(task, size, f2 - f1, max(0.0, m2 - m1), max(0.0, 2 * m1 - m2))


def recipe_costs(model, tasks_cfg: Mapping[str, Mapping[str, Any]], default_size: int, bf16: bool = True) -> dict:
    """:func:`task_cost` of every task at its input size (``img_size``, or ``max_size`` for short-side
    resizing)."""
    out = {}
    for task, tc in tasks_cfg.items():
        side = canvas_side(int(tc.get("img_size") or default_size), tc.get("resize"), tc.get("max_size"))
        out[task] = task_cost(model, task, side, bf16)
    return out


def step_estimate(costs: Mapping[str, StepCost], batches: Mapping[str, int], tasks_per_step: int, num_params: int,
                  gpus: int = 1, peak_tflops: float = H100_BF16_TFLOPS, mfu: float = 0.35) -> dict:
    """Seconds per step and memory per GPU for global ``batches`` split over ``gpus`` data-parallel
    ranks, every task in every step when ``tasks_per_step`` equals the task count (else the mean).
    Memory: fp32 weights, gradients and AdamW moments (16 bytes a parameter) + the activations of
    one step's tasks (backward runs after all of them)."""
    share = min(1.0, tasks_per_step / max(1, len(costs)))
    flops = sum(c.train_flops * batches[t] / gpus for t, c in costs.items()) * share
    act = sum((c.activation_bytes * math.ceil(batches[t] / gpus) + c.fixed_bytes) for t, c in costs.items()) * share
    seconds = flops / (peak_tflops * 1e12 * mfu)
    return {"step_seconds": seconds, "memory_gb": (16 * num_params + act) / 1e9, "activation_gb": act / 1e9,
            "images_per_second": {t: batches[t] / gpus * share / seconds for t in costs}}  # per GPU
