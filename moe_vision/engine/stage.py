"""Training stages of pretrain-adapt-finetune: ``train.stage=adapt`` freezes every tensor loaded
from ``model.init_from`` (experts, routers, decoders, queries, normalisation statistics) and
trains only what is new (adapters, LV-Adapters, heads); ``finetune`` trains everything. After an
adapt stage the frozen tensors are compared with their loaded values, bit for bit."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .optim import parameter_counts

STAGES = ("finetune", "adapt")


def check_stage(stage: str, pretrained: bool, trainable: str) -> None:
    """``pretrained``: the model starts from trained weights (``model.init_from``, or a model
    handed in by a surgery tool)."""
    if stage not in STAGES:
        raise ValueError(f"train.stage={stage!r}; expected one of {list(STAGES)}")
    if stage == "adapt" and not pretrained:
        raise ValueError("train.stage=adapt freezes the pre-trained tensors: set model.init_from to the "
                         "pre-trained run (e.g. model.init_from=runs/pretrain_glid)")
    if stage == "adapt" and trainable != "all":
        raise ValueError(f"train.stage=adapt chooses what trains (everything not loaded); leave train.trainable "
                         f"at 'all' (got {trainable!r})")


def check_adapter_tensors(init_report: Mapping) -> None:
    """Adapter or LV tensors in the source that this model would drop mean a config mismatch."""
    dropped = [n for n in init_report["ignored"] if n.startswith(("adapters.", "lv."))]
    if dropped:
        raise ValueError(f"model.init_from={init_report['source']} holds adapter/LV tensors (e.g. {dropped[0]}) that "
                         "this config does not build: set the same adapters.* / lv.* options as that run "
                         "(e.g. adapters.enabled=true)")


def freeze_pretrained(model: nn.Module, init_report: Mapping) -> dict:
    """Freeze every parameter loaded from the pre-trained source; return the parameter counts,
    the trainable fraction and a snapshot of every loaded tensor (parameters and buffers) for :func:`frozen_unchanged`."""
    loaded = set(init_report["loaded"]) | set(init_report["routers_from"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in loaded)
    snapshot = {n: t.detach().clone() for n, t in model.state_dict().items() if n in loaded}
    counts = parameter_counts(model)
    if counts["trainable"] == 0:
        raise ValueError(f"train.stage=adapt froze all {counts['total']:,} parameters (every one was loaded from "
                         f"{init_report['source']}): nothing is left to train; enable adapters.enabled=true and/or "
                         "lv.enabled=true, or train a new task")
    return {**counts, "trainable_fraction": counts["trainable"] / counts["total"], "snapshot": snapshot}


def frozen_unchanged(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> dict:
    """``{"frozen_tensors", "identical", "changed"}`` comparing ``model`` with the snapshot."""
    state = model.state_dict()
    changed = sorted(n for n, t in snapshot.items() if not torch.equal(state[n].detach().cpu(), t.cpu()))
    return {"frozen_tensors": len(snapshot), "identical": not changed, "changed": changed}
