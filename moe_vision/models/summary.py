"""A readable summary of a backbone: sizes, feature shapes and expert usage on random images."""
from __future__ import annotations

from typing import Sequence

import torch

from ..moe import ExpertUsage
from .factory import count_parameters
from .moe_vit import MoEViT


@torch.no_grad()
def summarize(model: MoEViT, tasks: Sequence[str], batch_size: int = 4, seed: int = 0,
              device: str | torch.device = "cpu") -> tuple[str, dict]:
    """Run one forward pass per task on random images; return (printable text, figures dict)."""
    model = model.to(device).eval()
    size = model.config["img_size"]
    x = torch.randn(batch_size, model.config["in_chans"], size, size,
                    generator=torch.Generator().manual_seed(seed)).to(device)
    usage = ExpertUsage(model.moe_layers(), tasks)
    lines, shapes = [], {}
    for task in tasks:
        maps, routing = model.forward_multiscale(x, task, return_routing=True)
        usage.update(routing)
        shapes[task] = [list(m.shape) for m in maps]
    params = count_parameters(model)
    lines.append(f"model: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active per "
                 f"token and task; {len(model.blocks)} blocks, {len(model.moe_layers())} MoE layers")
    lines.append(f"multi-scale feature maps for {batch_size} images of {size}px: {shapes[tasks[0]]}")
    freq = usage.frequency()
    for li, layer in enumerate(usage.layers):
        per_task = "  ".join(f"{t}: top experts {freq[li, si].topk(min(3, freq.shape[-1])).indices.tolist()}"
                             for si, t in enumerate(tasks))
        lines.append(f"  {layer:<16} {per_task}")
    return "\n".join(lines), {"parameters": params, "feature_shapes": shapes, "usage": usage.to_dict()}
