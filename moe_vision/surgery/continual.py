"""Adding a task to a trained generalist without touching what it already knows.

The new task gets ``n`` new experts in every MoE layer (a separate expert group, so the old
experts' tensors can be frozen as whole parameters), its own router over old + new experts, a
task embedding and a head; the GLID decoder and queries are reused. Every pre-existing parameter
gets ``requires_grad=False`` (on the parameter itself) and is left out of the optimizer; old
tasks' routers keep seeing only the old experts, so their outputs stay bit-identical.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..tasks import GeneralistModel


def add_task(model: GeneralistModel, task: str, task_cfg: dict, new_experts: int = 2) -> GeneralistModel:
    """A new model = ``model`` + ``task``, with everything that existed before frozen."""
    if task in model.tasks:
        raise ValueError(f"task {task!r} already exists in this model (tasks {model.tasks})")
    if new_experts < 0:
        raise ValueError(f"--new-experts must be >= 0, got {new_experts}")
    cfg = copy.deepcopy(model.config)
    moe = cfg["backbone"]["moe"]
    if moe.get("router_mode", "per_task") != "per_task":
        raise ValueError("adding a task without changing old tasks needs moe.router_mode=per_task "
                         "(a shared router would see the new experts for every task)")
    groups = list(moe.get("added_experts", []))
    visible = dict(moe.get("task_added_groups", {}))
    for t in model.tasks:
        visible.setdefault(t, len(groups))  # old tasks never see the group added now
    moe["added_experts"] = groups + [new_experts]
    moe["task_added_groups"] = visible
    cfg["backbone"]["tasks"] = list(cfg["backbone"]["tasks"]) + [task]
    cfg["tasks"][task] = dict(task_cfg)
    grown = GeneralistModel(**cfg)
    old_state = model.state_dict()
    result = grown.load_state_dict(old_state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"internal: keys not placed in the grown model: {result.unexpected_keys[:5]}")
    new_keys = set(result.missing_keys)
    _init_new_experts_from_old(grown, len(groups))
    _init_task_norm_from_old(grown, model.tasks[0], task)
    for name, p in grown.named_parameters():
        p.requires_grad_(name in new_keys)
    grown.frozen_keys = sorted(set(old_state))
    return grown


@torch.no_grad()
def _init_task_norm_from_old(model: GeneralistModel, old: str, new: str) -> None:
    """A new task's per-task normalisation (``model.task_norm``) starts as an old task's."""
    from ..models.task_norm import TaskBatchNorm2d
    for m in model.modules():
        if isinstance(m, TaskBatchNorm2d):
            m.per_task[new].load_state_dict(m.per_task[old].state_dict())


@torch.no_grad()
def _init_new_experts_from_old(model: GeneralistModel, group: int) -> None:
    """Start each new expert as a copy of an old one (round robin): a better start than random."""
    for module in model.backbone.modules():
        added = getattr(module, "added_experts", None)
        if isinstance(added, nn.ModuleList) and len(added) > group:
            new, old = added[group], module.experts
            for e in range(new.num_experts):
                src = e % old.num_experts
                for name in ("w1", "b1", "w2", "b2"):
                    dst = getattr(new, name)
                    if dst is not None:
                        dst[e].copy_(getattr(old, name)[src])


@torch.no_grad()
def outputs_on_probe(model: GeneralistModel, tasks: list[str], images: torch.Tensor) -> dict[str, dict]:
    model.eval()
    return {t: {k: v.clone() for k, v in model(images, t).items() if isinstance(v, torch.Tensor)} for t in tasks}


def bit_identical(a: dict[str, dict], b: dict[str, dict]) -> bool:
    return all(torch.equal(a[t][k], b[t][k]) for t in a for k in a[t])
