"""Build a backbone from a config mapping (the ``model`` group of the Hydra configs)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import timm

from . import registry  # noqa: F401  (registers the entrypoints)
from .checkpoint import load_model
from .moe_vit import MoEViT
from .upcycle import upcycle_from_dense


def build_model(cfg: Mapping[str, Any], tasks: Iterable[str]) -> MoEViT:
    """``cfg`` holds ``name`` (a registry entrypoint), optional architecture overrides
    (``img_size``, ``depth``, ...), ``moe`` options, and optionally ``checkpoint`` (a file written by
    :func:`save_model`, which then defines the model) or ``upcycle_from`` (a dense timm ViT file)."""
    cfg = dict(cfg)
    checkpoint = cfg.pop("checkpoint", None)
    if checkpoint:
        model = load_model(checkpoint)
        missing = [t for t in tasks if t not in model.tasks]
        if missing:
            raise ValueError(f"checkpoint {checkpoint} has no task(s) {missing}; it knows {model.tasks}")
        return model
    name = cfg.pop("name", None)
    known = timm.list_models("moe_vit_*")
    if name not in known:
        raise ValueError(f"model.name={name!r} is not a moe-vision model; expected one of {known}")
    dense = cfg.pop("upcycle_from", None)
    model = timm.create_model(name, tasks=list(tasks), **cfg)
    if dense:
        upcycle_from_dense(model, dense)
    return model


def count_parameters(model: MoEViT) -> dict[str, int]:
    """Total parameters, and the parameters one token of one task actually uses (``active``):
    in each MoE layer only ``top_k`` of the experts and one task's router count."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        experts = getattr(module, "experts", None) or getattr(module, "q_experts", None)
        router = getattr(module, "router", None)
        if experts is None or router is None:
            continue
        E, K = module.num_experts, module.top_k
        expert_params = sum(p.numel() for n, p in module.named_parameters() if "experts" in n)
        inactive += expert_params * (E - K) // E
        gates = [g for k, g in router.gates.items() if k != "shared"]
        inactive += sum(p.numel() for g in gates[1:] for p in g.parameters())
    inactive += sum(p.numel() for p in list(model.task_embed.values())[1:])
    return {"total": total, "active": total - inactive}
